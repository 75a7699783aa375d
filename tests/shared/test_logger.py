"""shared.logger.RunLogger: metrics.jsonl lines, TensorBoard scalars and images, silent when disabled."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shared.logger import RunLogger


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_scalars_go_to_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

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
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/lr")] == [(1, 0.25)]


def test_lines_survive_without_close_and_resume_appends(tmp_path):
    log = RunLogger(tmp_path)
    log.scalars(1, {"loss": 1.0})
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]  # flushed before close
    log.close()
    log.close()  # idempotent
    with RunLogger(tmp_path) as again:
        again.scalars(2, {"loss": 0.5})
    assert [line["step"] for line in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_disabled_logger_writes_nothing(tmp_path):
    run = tmp_path / "run"
    log = RunLogger(run, enabled=False)
    log.scalars(1, {"loss": 1.0})
    log.image("img", 1, np.zeros((2, 2, 3), np.uint8))
    bar = log.progress(range(3), desc="x")
    assert bar.disable and list(bar) == [0, 1, 2]
    log.close()
    assert not run.exists()


def test_progress_enabled(tmp_path):
    with RunLogger(tmp_path) as log:
        bar = log.progress(total=4, desc="train")
        assert not bar.disable and bar.total == 4
        bar.update(4)
        bar.close()


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
