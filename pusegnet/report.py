"""The calibration block of a PU-SegNet run, beside the base segmenter it was trained from.

On the cached validation features (flip-averaged, logits upsampled to the labels, clusters mapped to classes by
each model's own Hungarian matching): ECE / MCE (15 bins), NLL, Brier and the reliability diagram of PU-SegNet
(mean-field softmax), of PU-SegNet after smoothing and of the base (its cluster softmax); the error-detection
AUROC and the accuracy-rejection curve of PU-SegNet's variance and of the base's 1 - max probability.
Writes ``calibration.json``, ``figures/reliability.png`` (the diagrams side by side), ``figures/rejection.png``
and adds the headline numbers to ``final_metrics.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from shared import dist as sdist
from shared.atomic_io import atomic_path, atomic_write_text
from shared.calibration import CalibrationAccumulator, UncertaintyAccumulator
from shared.evaluation import flip_averaged_logits, score_segmenter
from shared.finish import FINAL_METRICS
from shared.segmenter import load

PANELS = (("pusegnet", "PU-SegNet"), ("pusegnet_smoothed", "PU-SegNet + smoothing"), ("base", "base segmenter"))


def _up(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)


def accumulate(ours, base, val, val_flip, mappings: dict, n_classes: int, n_bins: int, variance_max: float,
               batch_size: int, device) -> dict:
    """Calibration and uncertainty accumulators over this rank's shard, summed over ranks, computed."""
    calib = {name: CalibrationAccumulator(n_bins, n_classes) for name, _ in PANELS}
    unc = {"pusegnet": UncertaintyAccumulator(1000, (0.0, variance_max)), "base": UncertaintyAccumulator()}
    shard = np.arange(sdist.get_rank(), len(val), sdist.get_world_size())
    with torch.no_grad():
        for s in range(0, len(shard), batch_size):
            idx = shard[s:s + batch_size]
            x = torch.from_numpy(np.asarray(val.features[idx], dtype=np.float32)).to(device)
            xf = torch.from_numpy(np.asarray(val_flip.features[idx], dtype=np.float32)).to(device)
            labels = torch.from_numpy(np.asarray(val.labels[idx], dtype=np.int64))
            size = labels.shape[-2:]
            mine, theirs = flip_averaged_logits(ours, x, xf), flip_averaged_logits(base, x, xf)
            probs = {"pusegnet": torch.softmax(_up(mine["cluster_logits"], size), 1).cpu(),
                     "pusegnet_smoothed": torch.softmax(_up(mine["smoothed_logits"], size), 1).cpu(),
                     "base": torch.softmax(_up(theirs["cluster_logits"], size), 1).cpu()}
            for name, p in probs.items():
                calib[name].update(p, labels, mappings[name])
            variance = _up(mine["variance"][:, None], size)[:, 0].cpu()
            unc["pusegnet"].update(variance, probs["pusegnet"].argmax(1), labels, mappings["pusegnet"])
            confidence, pred = probs["base"].max(1)
            unc["base"].update(1.0 - confidence, pred, labels, mappings["base"])
    return {"calibration": {k: a.all_reduce().compute() for k, a in calib.items()},
            "uncertainty": {k: a.all_reduce().compute() for k, a in unc.items()}}


def reliability_figure(calibration: dict, path: Path) -> None:
    """The reliability diagrams side by side (accuracy per confidence bin against the diagonal)."""
    fig = Figure(figsize=(4 * len(PANELS), 4), dpi=100)
    axes = fig.subplots(1, len(PANELS))
    for ax, (name, title) in zip(axes, PANELS, strict=True):
        result = calibration[name]
        edges = np.asarray(result["bins"]["edges"])
        acc = np.array([np.nan if v is None else v for v in result["bins"]["accuracy"]])
        ax.bar(edges[:-1], np.nan_to_num(acc), width=np.diff(edges), align="edge", edgecolor="black")
        ax.plot([0, 1], [0, 1], "--", color="gray")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
               title=f"{title}\nECE {100 * result['ece']:.1f}%  NLL {result['nll']:.2f}")
    fig.tight_layout()
    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, format="png")


def rejection_figure(uncertainty: dict, path: Path) -> None:
    """Accuracy of the kept pixels against the fraction of most uncertain pixels rejected, both models."""
    fig = Figure(figsize=(5, 4), dpi=100)
    ax = fig.subplots()
    for name, label in (("pusegnet", "PU-SegNet variance"), ("base", "base 1 - max prob")):
        rej = uncertainty[name]["rejection"]
        ax.plot(rej["fraction"], rej["accuracy"], marker="o", markersize=3,
                label=f"{label} (AUROC {uncertainty[name]['auroc']:.3f})")
    ax.set(xlabel="fraction of most uncertain pixels rejected", ylabel="accuracy of the rest", xlim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, format="png")


def headline(block: dict) -> dict:
    """Flat numbers for final_metrics.json (ECE etc. as fractions, as shared.calibration reports them)."""
    out = {}
    for name, result in block["calibration"].items():
        for key in ("ece", "mce", "nll", "brier"):
            out[f"calibration/{name}/{key}"] = result[key]
    for name, result in block["uncertainty"].items():
        out[f"uncertainty/{name}/auroc"] = result["auroc"]
    for key in ("acc", "miou"):
        out[f"base/unsupervised/{key}"] = block["base_scores"][key]
    return out


def calibration_block(finished, base, val, val_flip, val_ds, run_dir: Path, cfg, logger, *, is_main: bool,
                      device) -> dict:
    """Compute, write and log the calibration block (collective under DDP); returns it."""
    ours = load(finished.export_path, map_location=device)
    base_scores = score_segmenter(base, val, flipped=val_flip, n_classes=val_ds.n_classes,
                                  extra_policy=cfg.extra_policy, batch_size=cfg.val_batch_size, device=str(device))
    scores = finished.scores
    mappings = {"pusegnet": scores["unsupervised"]["mapping"], "pusegnet_smoothed": scores["smoothed"]["mapping"],
                "base": base_scores["unsupervised"]["mapping"]}
    variance_max = 2.0 / cfg.gp_ridge if cfg.sngp else 1.0  # |phi|^2 <= 2 and Sigma <= I / tau
    block = accumulate(ours, base, val, val_flip, mappings, val_ds.n_classes, cfg.calibration_bins, variance_max,
                       cfg.val_batch_size, device)
    block["base_scores"] = {k: base_scores["unsupervised"][k] for k in ("acc", "miou")}
    if is_main:
        atomic_write_text(run_dir / "calibration.json", json.dumps(block, indent=1) + "\n")
        reliability_figure(block["calibration"], run_dir / "figures" / "reliability.png")
        rejection_figure(block["uncertainty"], run_dir / "figures" / "rejection.png")
        numbers = headline(block)
        final = json.loads((run_dir / FINAL_METRICS).read_text()) | numbers
        atomic_write_text(run_dir / FINAL_METRICS, json.dumps(final, indent=2) + "\n")
        finished.metrics.update(numbers)
        logger.scalars(int(cfg.max_steps), numbers, prefix="final")
        logger.write("calibration: " + ", ".join(f"{k} {v:.3f}" for k, v in numbers.items()))
    return block
