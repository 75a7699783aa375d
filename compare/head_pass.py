"""The second pass over cached features: throughput, peak memory, calibration and the figure's class maps.

It reuses the Hungarian mapping found by `shared.evaluation.evaluate_head`, so the colours in the figure and the
calibration's classes are exactly the ones behind the table's numbers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from compare.measure import PeakMemory


@dataclass
class HeadPass:
    """What one pass measured. Arrays are (F, R, R) for the F figure images (None when F = 0)."""

    images_per_s: float
    peak_memory_mib: float
    calibration: dict
    predictions: np.ndarray | None
    uncertainty: np.ndarray | None


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, K, h, w) -> (B, K, H, W), bilinear as in `shared.evaluation`."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def synchronize(device: str | torch.device) -> None:
    """Wait for queued CUDA work so that a timing covers it; nothing to do on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def class_probabilities(logits: torch.Tensor, mapping: Sequence[int], n_classes: int) -> torch.Tensor:
    """Cluster logits (B, K', H, W) -> class probabilities (B, K + 1, H, W) through the Hungarian mapping; the last
    channel holds the mass of unmatched clusters (a "none" outcome that is never right)."""
    from shared.calibration import map_to_classes

    b, k, h, w = logits.shape
    flat = logits.softmax(1).permute(0, 2, 3, 1).reshape(-1, k)  # (B*H*W, K')
    return map_to_classes(flat, mapping, n_classes).reshape(b, h, w, n_classes + 1).permute(0, 3, 1, 2)


def head_pass(segmenter: Any, features: Any, flipped: Any, mapping: Sequence[int], options: Any,
              figure_indices: Sequence[int], *, probabilistic: bool) -> HeadPass:
    """Run the head over every cached image once; see the module docstring."""
    from shared.calibration import CalibrationAccumulator
    from shared.evaluation import flip_averaged_logits

    n_classes, device = options.n_classes, options.device
    lut = torch.tensor([c if 0 <= c < n_classes else -1 for c in mapping], device=device)
    calibration = CalibrationAccumulator(n_bins=15, n_classes=n_classes)
    peak, seconds = PeakMemory(device), 0.0
    wanted = {int(i): row for row, i in enumerate(figure_indices)}
    size = tuple(features.labels.shape[-2:])
    predictions = np.full((len(wanted), *size), -1, dtype=np.int64) if wanted else None
    uncertainty = np.zeros((len(wanted), *size), dtype=np.float32) if wanted else None
    has_uncertainty = False
    n = len(features.features)
    with torch.no_grad():  # warm-up: the first call pays for one-off allocations and kernel selection
        first = torch.from_numpy(np.asarray(features.features[:1], dtype=np.float32)).to(device)
        flip_averaged_logits(segmenter, first, None)
    for start in range(0, n, options.batch_size):
        stop = min(n, start + options.batch_size)
        # Reading the float16 memmap is the cache's cost, not the head's: done before the clock starts.
        x = torch.from_numpy(np.asarray(features.features[start:stop], dtype=np.float32)).to(device)
        xf = None if flipped is None else torch.from_numpy(np.asarray(flipped.features[start:stop], np.float32))
        xf = None if xf is None else xf.to(device)
        with peak.measure(), torch.no_grad():
            began = time.perf_counter()
            out = flip_averaged_logits(segmenter, x, xf)
            logits = upsample_logits(out["cluster_logits"].float(), size)  # (B, K', R, R)
            pred = lut[logits.argmax(1)]  # (B, R, R) class ids, -1 for unmatched clusters
            synchronize(device)
            seconds += time.perf_counter() - began
        with torch.no_grad():
            target = torch.from_numpy(np.asarray(features.labels[start:stop], dtype=np.int64))
            calibration.update(logits.softmax(1).cpu(), target, mapping)
            shown = [b for b in range(stop - start) if start + b in wanted]
            unc = _uncertainty(segmenter, x, logits, mapping, n_classes, size, probabilistic) if shown else None
        for b in shown:
            predictions[wanted[start + b]] = pred[b].cpu().numpy()
            if unc is not None:
                uncertainty[wanted[start + b]], has_uncertainty = unc[b].cpu().numpy(), True
    return HeadPass(images_per_s=n / max(seconds, 1e-9), peak_memory_mib=peak.mib,
                    calibration=_calibration_summary(calibration, probabilistic), predictions=predictions,
                    uncertainty=uncertainty if has_uncertainty else None)


def _uncertainty(segmenter: Any, x: torch.Tensor, logits: torch.Tensor, mapping: Sequence[int], n_classes: int,
                 size: tuple, probabilistic: bool) -> torch.Tensor | None:
    """(B, R, R) uncertainty in [0, 1]: a `variance` output of the head normalised per image, else 1 - max class
    probability for probabilistic methods, else None (a deterministic method has no uncertainty map)."""
    variance = segmenter(x).get("variance")  # only a head that exports one has it (figure images only)
    if isinstance(variance, torch.Tensor):
        var = upsample_logits(variance.float().reshape(variance.shape[0], -1, *variance.shape[-2:]), size).mean(1)
        top = var.flatten(1).amax(1).clamp_min(1e-12)
        return var / top[:, None, None]
    if probabilistic:
        return 1.0 - class_probabilities(logits, mapping, n_classes).amax(1)
    return None


def _calibration_summary(calibration: Any, probabilistic: bool) -> dict:
    values = calibration.compute()
    return {"ece": float(values["ece"]), "nll": float(values["nll"]),
            "source": "probabilistic" if probabilistic else "cluster-softmax"}
