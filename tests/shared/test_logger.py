"""shared.logger.RunLogger: what lands in metrics.jsonl, the TensorBoard event file and the terminal, on rank 0
only; everything is read back from disk or the captured streams."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from shared import dist as sdist
from shared.logger import RunLogger


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the event files in `run_dir`: tag -> [(step, value)], as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_scalars_go_to_jsonl_and_tensorboard(tmp_path):
    with RunLogger(tmp_path) as log:
        log.scalars(1, {"loss": torch.tensor(0.5), "lr": np.float32(0.25)}, prefix="train")
        log.scalars(2, {"miou": 41}, prefix="val/")
        log.scalars(3, {"loss": float("nan")}, prefix="train")
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert lines == [
        {"step": 1, "train/loss": 0.5, "train/lr": 0.25},
        {"step": 2, "val/miou": 41.0},
        {"step": 3, "train/loss": None},  # non-finite -> null keeps the file strict JSON
    ]
    scalars = read_scalars(tmp_path)
    assert sorted(scalars) == ["train/loss", "train/lr", "val/miou"]  # prefixes joined with one "/"
    assert scalars["train/lr"] == [(1, 0.25)] and scalars["val/miou"] == [(2, 41.0)]
    (step1, loss1), (step3, loss3) = scalars["train/loss"]
    assert (step1, loss1) == (1, 0.5) and step3 == 3 and math.isnan(loss3)  # TensorBoard keeps the NaN


def test_tensorboard_series_keep_steps_and_float32_values(tmp_path):
    values = [0.1, -2.5e-4, 3.0e6]
    with RunLogger(tmp_path) as log:
        for step, value in zip((0, 10, 20), values, strict=True):
            log.scalars(step, {"loss": value, "step_time": torch.tensor(step / 10.0, dtype=torch.float64)})
    scalars = read_scalars(tmp_path)
    assert scalars["loss"] == [(s, pytest.approx(v, rel=1e-7)) for s, v in zip((0, 10, 20), values, strict=True)]
    assert scalars["step_time"] == [(0, 0.0), (10, 1.0), (20, 2.0)]


def test_flush_makes_scalars_readable_before_close(tmp_path):
    log = RunLogger(tmp_path)
    log.scalars(7, {"loss": 1.5}, prefix="train")
    log.flush()
    assert read_scalars(tmp_path) == {"train/loss": [(7, 1.5)]}  # a run killed now keeps its curve
    log.close()


def test_lines_survive_without_close_and_resume_appends(tmp_path):
    log = RunLogger(tmp_path)
    log.scalars(1, {"loss": 1.0})
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]  # flushed before close
    log.close()
    log.close()  # idempotent
    with RunLogger(tmp_path) as again:
        again.scalars(2, {"loss": 0.5})
    assert [line["step"] for line in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


@pytest.fixture(params=["disabled", "rank 1"])
def silent_logger(request, tmp_path, monkeypatch):
    """A logger that must do nothing: built with enabled=False, or with enabled=True on a rank other than 0."""
    run = tmp_path / "run"
    if request.param == "rank 1":
        monkeypatch.setattr(sdist, "get_rank", lambda: 1)  # what torch.distributed reports on the second rank
        return RunLogger(run, enabled=True), run
    return RunLogger(run, enabled=False), run


def test_silent_logger_writes_nothing_anywhere(silent_logger, capsys):
    log, run = silent_logger
    assert not log.enabled
    log.scalars(1, {"loss": 1.0})
    log.image("img", 1, np.zeros((2, 2, 3), np.uint8))
    log.write("hello")
    assert list(log.progress(range(3), desc="train")) == [0, 1, 2]  # still iterates
    manual = log.progress(total=4, desc="val")
    manual.update(4)
    manual.close()
    log.flush()
    log.close()
    assert not run.exists()  # no event file, no metrics.jsonl, not even the directory
    assert capsys.readouterr() == ("", "")  # no bar, no message


def test_progress_bar_and_messages_on_the_main_rank(tmp_path, capsys):
    with RunLogger(tmp_path) as log:
        assert list(log.progress(range(3), desc="train")) == [0, 1, 2]
        log.write("val miou 41.0")
    out, err = capsys.readouterr()
    assert out == "val miou 41.0\n"  # messages on stdout, whole lines
    assert "train" in err and "3/3" in err  # the bar on stderr, so piping stdout keeps only the messages


def test_images_and_bad_inputs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLogger(tmp_path) as log:
        log.image("figs/overlay", 5, np.full((4, 6, 3), 200, np.uint8))
        log.image("figs/mask", 5, np.zeros((4, 6), np.uint8))
        with pytest.raises(TypeError, match="'figs/x' must be uint8"):
            log.image("figs/x", 5, np.zeros((4, 6, 3), np.float32))
        with pytest.raises(ValueError, match="got \\(4, 6, 2\\)"):
            log.image("figs/x", 5, np.zeros((4, 6, 2), np.uint8))
        with pytest.raises(TypeError, match="'train/loss' must be a single number"):
            log.scalars(1, {"loss": torch.ones(2)}, prefix="train")
        with pytest.raises(TypeError, match="'name' must be a number"):
            log.scalars(1, {"name": "abc"})
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    image = events.Images("figs/overlay")[0]
    assert (image.step, image.width, image.height) == (5, 6, 4)
