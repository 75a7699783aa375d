"""The README's commands point where the code writes: its `make compare` / `make eval` examples name the run
directories `make demo` creates, its `make train-*` / `make fit-kmeans` examples name existing configs, and it names
the export file the trainers write."""

from __future__ import annotations

import inspect
import re
import shlex
from pathlib import Path

from compare import demo
from shared.run_dir import EXPORT_RELATIVE

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text(encoding="utf-8")


def make_commands() -> list[list[str]]:
    """Every `make <target> ...` command of the README (code blocks and inline code), split like a shell would."""
    block = [shlex.split(m) for m in re.findall(r"^(make [^\n#]*)", README, flags=re.MULTILINE)]
    inline = [shlex.split(m) for m in re.findall(r"`(make [^`]*)`", README)]
    return block + inline


def variables(command: list[str]) -> dict[str, str]:
    return dict(arg.split("=", 1) for arg in command[2:] if "=" in arg and not arg.startswith("-"))


def demo_run_dirs() -> set[str]:
    """Where `make demo` (python -m compare.demo, default arguments) writes each method's run."""
    out = inspect.signature(demo.run_demo).parameters["out"].default
    return {str(Path(out) / "runs" / method / demo.DATASET / demo.FULL["run_name"]) for method in demo.METHODS}


def test_compare_and_eval_examples_name_the_demo_runs():
    runs = demo_run_dirs()
    checked = 0
    for command in make_commands():
        target, names = command[1], variables(command)
        if target == "compare" and names.get("DATASET") == demo.DATASET:
            assert set(names["RUNS"].split()) <= runs, (names["RUNS"], runs)
            checked += 1
        elif target == "eval":
            assert names["RUN"] in runs, (names["RUN"], runs)
            checked += 1
    assert checked >= 2


def test_train_examples_name_existing_configs():
    checked = 0
    for command in make_commands():
        target = command[1]
        if "<" in target or "DATASET" not in variables(command):  # the template, or a name mentioned in prose
            continue
        if not (target.startswith("train-") or target == "fit-kmeans"):
            continue
        aliases = {"fit-kmeans": "kmeans", "train-puis": "pusegnet"}  # the Makefile's alias targets
        method = aliases.get(target) or target.removeprefix("train-")
        directory = REPO / method if (REPO / method / "train.py").is_file() else REPO / "baselines" / method
        assert (directory / "configs" / f"{variables(command)['DATASET']}.yaml").is_file(), command
        checked += 1
    assert checked >= 3


def test_the_readme_names_the_export_file_the_trainers_write():
    assert str(EXPORT_RELATIVE) in README
    assert not re.search(r"segmenter\.pt(?!2)", README)
