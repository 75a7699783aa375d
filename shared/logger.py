"""Run logging: TensorBoard event files, ``metrics.jsonl`` and tqdm progress bars, on rank 0 only.

::

    log = RunLogger(run_dir, enabled=ctx.is_main)
    for step in log.progress(range(start, steps), desc="train"):
        ...
        log.scalars(step, {"loss": loss.item(), "lr": lr}, prefix="train")
    log.image("val/overlay", step, overlay_hwc_uint8)
    log.close()

``metrics.jsonl`` gets one JSON object per ``scalars`` call, e.g. ``{"step": 120, "train/loss": 0.42}``,
appended (a resumed run continues the same file) and flushed at once so a crash keeps every line written.
Non-finite values are written as ``null`` so the file stays strict JSON. On ranks other than 0, and with
``enabled=False``, every method is a silent no-op and progress bars are disabled.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from shared import dist as sdist

__all__ = ["RunLogger"]


def _to_float(name: str, value: Any) -> float:
    """A Python float from a number, 0-d tensor or numpy scalar; TypeError naming the metric otherwise."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"Metric {name!r} must be a single number, got a tensor of shape {tuple(value.shape)}.")
        return float(value.detach().cpu().item())
    if isinstance(value, (numbers.Real, np.generic)) and not isinstance(value, bool | np.bool_):
        return float(value)
    raise TypeError(f"Metric {name!r} must be a number, got {type(value).__name__} ({value!r}).")


class RunLogger:
    """TensorBoard + ``metrics.jsonl`` + progress bars for one run directory (see module docstring).

    Active only when ``enabled`` is True *and* this process is rank 0, so every rank may construct it.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = bool(enabled) and sdist.is_main_process()
        self._writer = None
        self._jsonl = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: slow, and unused on other ranks

            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.run_dir))
            self._jsonl = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    @property
    def metrics_path(self) -> Path:
        """``<run_dir>/metrics.jsonl``."""
        return self.run_dir / "metrics.jsonl"

    def scalars(self, step: int, values: dict[str, Any], prefix: str = "") -> None:
        """Log ``values`` (name -> number / 0-d tensor) at ``step`` as ``<prefix>/<name>``."""
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": int(step)}
        for name, value in values.items():
            key = f"{prefix.rstrip('/')}/{name}" if prefix else str(name)
            number = _to_float(key, value)
            self._writer.add_scalar(key, number, int(step))
            record[key] = number if math.isfinite(number) else None
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()  # a crash must not lose the lines already logged

    def image(self, tag: str, step: int, array_hwc_uint8: np.ndarray) -> None:
        """Log an image: uint8 array ``(H, W, 3)``, ``(H, W, 4)``, ``(H, W, 1)`` or ``(H, W)``."""
        if not self.enabled:
            return
        arr = np.asarray(array_hwc_uint8)
        if arr.dtype != np.uint8:
            raise TypeError(f"Image {tag!r} must be uint8 (H, W, C), got dtype {arr.dtype}.")
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise ValueError(
                f"Image {tag!r} must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {arr.shape}."
            )
        self._writer.add_image(tag, arr, int(step), dataformats="HWC")

    def progress(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "") -> tqdm:
        """A tqdm bar over ``iterable`` (or a manual one with ``total``); disabled unless this logger is active."""
        return tqdm(iterable, total=total, desc=desc, disable=not self.enabled, dynamic_ncols=True, file=sys.stderr)

    def write(self, message: str) -> None:
        """Print ``message`` on the active rank without breaking progress bars."""
        if self.enabled:
            tqdm.write(message, file=sys.stdout)

    def flush(self) -> None:
        """Push pending TensorBoard events to disk (the jsonl file is flushed on every write)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the writers; safe to call twice."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        self.enabled = False

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
