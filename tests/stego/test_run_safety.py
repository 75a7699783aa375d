"""STEGO as the test subject of the run-safety mechanisms (tiny config, random backbone, 28 px):

- SIGTERM, then `--resume auto`, exports the same tensors as an uninterrupted run, for select_by=last and for
  select_by=val_miou (the stop step is not validated, so it never enters the best-checkpoint choice);
- the CLI exits 143 after saving, with one line, and a path with spaces and non-ASCII characters works through
  train, resume and compare;
- a second trainer on a locked run directory and a resume with other settings are one-sentence errors.
"""

from __future__ import annotations

import copy
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from sigterm_trainer import sigterm_after_logging

import stego.train as stego_train
from shared.checkpoint import load_checkpoint
from shared.config import load_config
from shared.run_dir import RunLockedError, run_lock
from shared.run_guard import RunInterrupted
from shared.run_start import ResumeMismatchError
from shared.segmenter import load
from stego.config import StegoConfig

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "stego" / "configs" / "tiny.yaml"
SMALL = ["resolution=28", "val_resolution=28"]
FAKE_BEST = 99.0


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("stego_safety")


def config(root: Path, name: str, *overrides: str) -> StegoConfig:
    cache = root.parent / "uss_feature_cache"  # the session's cache, shared with the other STEGO tests
    paths = [f"output_root={root / 'runs'}", f"cache_dir={cache}", f"nns_dir={root / 'nns'}"]
    return load_config(StegoConfig, TINY, [*paths, *SMALL, f"name={name}", *overrides])


def run_dir(root: Path, name: str) -> Path:
    return root / "runs" / "stego" / "camvid_sample" / name


class StopAt:
    """Sends this process SIGTERM during step `done` (1-based) and, for val_miou, fakes a record mIoU at that step:
    a validation of the stop step would then make its head the exported one."""

    def __init__(self, monkeypatch, done: int | None) -> None:
        self.done, self.step = done, 0
        real_check, real_validate = stego_train.check_finite, stego_train.validate

        def check(loss, step, *args, **kwargs):
            real_check(loss, step, *args, **kwargs)
            self.step = step + 1
            if self.step == self.done:
                os.kill(os.getpid(), signal.SIGTERM)

        def validate(*args, **kwargs):
            scores = real_validate(*args, **kwargs)
            if self.done is not None and self.step == self.done:
                scores = copy.deepcopy(scores)
                scores["unsupervised"]["miou"] = FAKE_BEST
            return scores

        monkeypatch.setattr(stego_train, "check_finite", check)
        monkeypatch.setattr(stego_train, "validate", validate)


def exported_outputs(path: Path) -> dict[str, torch.Tensor]:
    segmenter = load(path)
    features = torch.randn(2, segmenter.metadata["feature_dim"], 3, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return segmenter(features)


@pytest.mark.parametrize("select_by", ["last", "val_miou"])
def test_sigterm_then_resume_exports_the_same_tensors_as_an_uninterrupted_run(root, monkeypatch, select_by):
    common = ["max_steps=4", "val_every=2", f"select_by={select_by}"]
    StopAt(monkeypatch, None)
    straight = stego_train.main(config(root, f"straight-{select_by}", *common))
    StopAt(monkeypatch, 3)  # step 3 is not a validation step (val_every=2)
    with pytest.raises(RunInterrupted) as stopped:
        stego_train.main(config(root, f"stopped-{select_by}", *common))
    assert (stopped.value.step, stopped.value.exit_code) == (3, 143)
    stopped_dir = run_dir(root, f"stopped-{select_by}")
    assert load_checkpoint(stopped_dir / "checkpoints" / "last.pt")["step"] == 3
    assert not (stopped_dir / "export").exists()
    resumed = stego_train.main(config(root, f"stopped-{select_by}", *common, "resume=auto"))
    a, b = exported_outputs(straight.export_path), exported_outputs(resumed.export_path)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    if select_by == "val_miou":
        best = load_checkpoint(stopped_dir / "checkpoints" / "best.pt")
        assert best["step"] in (2, 4) and best["extra"]["best_miou"] != FAKE_BEST


def test_a_second_trainer_on_a_locked_run_directory_is_refused_naming_the_pid(root):
    cfg = config(root, "locked")
    with run_lock(run_dir(root, "locked")):
        with pytest.raises(RunLockedError, match=rf"in use by pid {os.getpid()} on .*; wait for that run"):
            stego_train.main(cfg)
    assert not (run_dir(root, "locked") / "config.yaml").exists()  # refused before anything was written


def test_a_resume_with_a_changed_learning_rate_is_refused(root):
    first = run_dir(root, "straight-last")
    if not (first / "checkpoints" / "last.pt").is_file():
        stego_train.main(config(root, "straight-last", "max_steps=4", "val_every=2"))
    before = (first / "config.yaml").read_text()
    with pytest.raises(ResumeMismatchError, match=r"lr_head: 0\.0005 in the checkpoint, 0\.001 now") as error:
        stego_train.main(config(root, "straight-last", "max_steps=6", "val_every=2", "resume=auto", "lr_head=1e-3"))
    assert "\n" not in str(error.value)
    assert (first / "config.yaml").read_text() == before  # still what the run used


def test_cli_sigterm_exits_143_and_a_path_with_spaces_and_accents_works_through_train_and_compare(root):
    from compare.run import CompareSettings, run_comparison

    base = root / "my runs" / "é ü"
    args = [f"output_root={base / 'runs'}", f"cache_dir={base / 'cache'}", *SMALL, "name=sig", "max_steps=100000",
            "val_every=100000", "log_every=1"]
    metrics = base / "runs" / "stego" / "camvid_sample" / "sig" / "metrics.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code, _, err = sigterm_after_logging([sys.executable, "-m", "stego.train", "--config", str(TINY), *args], cwd=REPO,
                                         env=env, metrics=metrics, lines=2, timeout_s=300)
    assert code == 143, err[-3000:]
    step = load_checkpoint(metrics.parent / "checkpoints" / "last.pt")["step"]
    assert err.strip().splitlines()[-1] == f"stopped at step {step}; resume with --resume auto"
    cfg = load_config(StegoConfig, TINY, [*args[:-3], f"max_steps={step + 1}", "val_every=100000", "log_every=1",
                                          "resume=auto"])
    finished = stego_train.main(cfg)
    assert finished.export_path.is_file() and "é ü" in str(finished.export_path)
    output = run_comparison(CompareSettings(
        dataset="camvid_sample", runs=[str(metrics.parent)], resolution=28, backbone_weights="none",
        out=str(base / "compare out"), cache_dir=str(base / "cache"), device="cpu", crf=False, probe_split="",
        figure_rows=1))
    (result,) = output.results
    assert result.status == "ok", result.error
    assert result.unsupervised["miou"] == pytest.approx(finished.metrics["unsupervised/miou"])
    assert (base / "compare out" / "report.md").is_file()
