"""shared.cli: a known error is one line on stderr and exit code 2 (--debug / USS_DEBUG=1 show the traceback), an
interrupted run exits 128 + signal with its one line, other errors keep their traceback; and the entry points use it
(`make fit-kmeans` without reachable weights prints the one-line weights error)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dinov2_patched.weights import WeightsLoadError, WeightsNotFoundError
from shared.checkpoint import CheckpointError
from shared.cli import is_known_error, run_cli, run_trainer
from shared.config import ConfigError
from shared.data.errors import BadSampleError, DatasetLayoutError
from shared.data.prepare.common import PrepareError
from shared.dist import DeviceUnavailableError
from shared.features import DescriptorError
from shared.run_dir import RunDirError, RunLockedError
from shared.run_guard import NonFiniteLossError, RunInterrupted
from shared.segmenter import SegmenterFormatError

REPO = Path(__file__).resolve().parents[2]
KNOWN = [ConfigError, DatasetLayoutError, BadSampleError, WeightsNotFoundError, WeightsLoadError, CheckpointError,
         SegmenterFormatError, DescriptorError, RunDirError, RunLockedError, PrepareError, DeviceUnavailableError]


def exit_of(fn, argv=()) -> int:
    with pytest.raises(SystemExit) as done:
        run_cli(fn, list(argv))
    return done.value.code


def raising(error: BaseException):
    def fn(argv):
        raise error

    return fn


@pytest.mark.parametrize("cls", KNOWN, ids=[c.__name__ for c in KNOWN])
def test_each_known_error_class_is_one_line_and_exit_code_2(cls, capsys, monkeypatch):
    monkeypatch.delenv("USS_DEBUG", raising=False)
    assert exit_of(raising(cls("The thing at /x is bad;\n  fix it."))) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: The thing at /x is bad; fix it.\n" and captured.out == ""


def test_non_finite_loss_is_known():
    assert is_known_error(NonFiniteLossError("Non-finite loss at step 3: nan.", 3, float("nan")))


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(how, monkeypatch):
    monkeypatch.setenv("USS_DEBUG", "1" if how == "env" else "0")
    seen = []

    def fn(argv):
        seen.append(argv)
        raise ConfigError("bad key")

    with pytest.raises(ConfigError):
        run_cli(fn, ["--debug", "a=1"] if how == "flag" else ["a=1"])
    assert seen == [["a=1"]]  # --debug is taken out before the command sees its arguments


def test_our_own_value_errors_are_one_line_but_library_ones_keep_the_traceback(capsys, monkeypatch):
    monkeypatch.delenv("USS_DEBUG", raising=False)

    def ours(argv):
        raise ValueError("n_clusters=0 is not valid; pass at least 1.")

    assert exit_of(ours) == 2
    assert capsys.readouterr().err == "error: n_clusters=0 is not valid; pass at least 1.\n"
    with pytest.raises(json.JSONDecodeError):  # a ValueError raised inside the json library: a bug, not bad input
        run_cli(lambda argv: json.loads("{"), [])
    with pytest.raises(ZeroDivisionError):
        run_cli(lambda argv: 1 / 0, [])


def test_exit_codes_of_results_and_interrupted_runs(capsys):
    assert exit_of(lambda argv: None) == 0
    assert exit_of(lambda argv: 1) == 1
    assert exit_of(lambda argv: object()) == 0  # a FinishedRun
    assert exit_of(raising(RunInterrupted(7, "SIGTERM"))) == 143
    assert capsys.readouterr().err == "stopped at step 7; resume with --resume auto\n"
    assert exit_of(raising(RunInterrupted(2, "SIGINT"))) == 130
    assert exit_of(raising(KeyboardInterrupt())) == 130


def test_run_trainer_parses_the_config_first(capsys, tmp_path, monkeypatch):
    from stego.config import StegoConfig

    monkeypatch.chdir(tmp_path)
    called = []
    with pytest.raises(SystemExit) as done:
        run_trainer(called.append, StegoConfig, ["batch_size=0"])
    assert done.value.code == 2 and called == []
    assert capsys.readouterr().err == "error: Config key 'batch_size' = 0 is out of range; valid range: >= 1.\n"
    assert list(tmp_path.iterdir()) == []  # nothing was created before the check
    with pytest.raises(SystemExit) as done:
        run_trainer(called.append, StegoConfig, ["batch_size=3"])
    assert done.value.code == 0 and called[0].batch_size == 3


def env_without_weights(tmp_path: Path) -> dict:
    """A HOME / TORCH_HOME with an empty weights cache and a download URL that refuses connections at once."""
    env = {**os.environ, "HOME": str(tmp_path), "TORCH_HOME": str(tmp_path / "torch"), "OMP_NUM_THREADS": "1",
           "DINO_WEIGHTS_BASE_URL": "http://127.0.0.1:9", "PYTHONPATH": str(REPO)}
    env.pop("USS_DEBUG", None)
    return env


def test_fit_kmeans_without_reachable_weights_prints_the_one_line_weights_error(tmp_path):
    """`make fit-kmeans` runs `python -m baselines.kmeans.train --config baselines/kmeans/configs/<DATASET>.yaml`."""
    cmd = [sys.executable, "-m", "baselines.kmeans.train", "--config", "baselines/kmeans/configs/camvid_sample.yaml",
           f"output_root={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(cmd, cwd=REPO, env=env_without_weights(tmp_path), capture_output=True, text=True,
                          timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: Weights dinov2_vits14_pretrain.pth for dinov2_vits14")
    assert str(tmp_path / "torch") in lines[0] and "backbone_weights=<path>" in lines[0]
    assert "Traceback" not in done.stderr


def test_the_entry_points_use_run_cli():
    for module in ("stego/train.py", "baselines/kmeans/train.py", "compare/run.py", "compare/demo.py",
                   "stego/convert.py", "shared/data/prepare/__main__.py"):
        tail = (REPO / module).read_text().split('if __name__ == "__main__":')[1]
        assert "run_cli(" in tail or "run_trainer(" in tail, module


@pytest.mark.parametrize(("option", "value", "expected"), [
    ("--batch-size", "0", "argument --batch-size: '0' is out of range; valid range: >= 1"),
    ("--resolution", "0", "argument --resolution: '0' is out of range; valid range: >= 8"),
    ("--figure-rows", "-1", "argument --figure-rows: '-1' is out of range; valid range: >= 0"),
    ("--batch-size", "x", "argument --batch-size: expected an integer, got 'x'"),
])
def test_compare_options_are_range_checked(option, value, expected, capsys):
    from compare.run import parse_args

    with pytest.raises(SystemExit) as done:
        parse_args(["--dataset", "camvid_sample", "--runs", "a", option, value])
    assert done.value.code == 2 and expected in capsys.readouterr().err


def test_positive_float_and_at_least():
    from shared.cli import at_least, positive_float

    assert at_least(1)("3") == 3 and positive_float("0.5") == 0.5
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(Exception, match="out of range"):
            positive_float(bad)
