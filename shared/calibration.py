"""Calibration and uncertainty quality, accumulated in fixed bins (memory independent of the pixel count).

- :class:`CalibrationAccumulator`: ECE / MCE over equal-width confidence bins, NLL and Brier score.
- :class:`UncertaintyAccumulator`: AUROC of an uncertainty score for detecting wrong pixels, and accuracy as a
  function of the fraction of most-uncertain pixels rejected, from histograms of the score.

Both sum their statistics across DDP ranks with ``all_reduce()``. ECE, MCE, Brier, accuracies and AUROC are
fractions in [0, 1] (not percent); NLL is in nats per pixel.

Cluster outputs: pass ``mapping`` (cluster -> class, -1 unmatched, e.g. ``scores["mapping"]``). Class
probabilities are then the sums of their clusters' probabilities, and the mass on unmatched clusters acts as
a "none" outcome that is never correct (consistent with the "error" extra-cluster policy).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure  # a bare Figure renders with Agg and never touches pyplot's global state

from shared import dist as sdist
from shared.atomic_io import atomic_path


def _flatten(probs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) / (N, C) probabilities and (B, H, W) / (N,) labels -> (P, C) float64 and (P,) long."""
    if probs.dim() == 4:
        probs = probs.permute(0, 2, 3, 1).reshape(-1, probs.shape[1])
    elif probs.dim() != 2:
        raise ValueError(f"probs must be (B, C, H, W) or (N, C), got {tuple(probs.shape)}.")
    target = target.reshape(-1).long().to(probs.device)
    if target.numel() != probs.shape[0]:
        raise ValueError(f"{target.numel()} labels for {probs.shape[0]} probability vectors; shapes must match.")
    return probs.double(), target


def map_to_classes(probs: torch.Tensor, mapping: Sequence[int] | torch.Tensor, n_classes: int) -> torch.Tensor:
    """Cluster probabilities (P, K') -> (P, n_classes + 1): mass summed per class, last column = unmatched."""
    mapping = torch.as_tensor(list(mapping) if not torch.is_tensor(mapping) else mapping, device=probs.device).long()
    if mapping.numel() != probs.shape[1]:
        raise ValueError(f"mapping has {mapping.numel()} entries for {probs.shape[1]} clusters.")
    column = torch.where(mapping >= 0, mapping, torch.full_like(mapping, n_classes))
    out = torch.zeros(probs.shape[0], n_classes + 1, dtype=probs.dtype, device=probs.device)
    return out.index_add_(1, column, probs)


class CalibrationAccumulator:
    """Reliability statistics in ``n_bins`` equal-width confidence bins (b/n, (b+1)/n], plus NLL and Brier sums."""

    def __init__(self, n_bins: int = 15, n_classes: int | None = None, eps: float = 1e-12) -> None:
        self.n_bins = n_bins
        self.n_classes = n_classes
        self.eps = eps
        self.bin_count = torch.zeros(n_bins, dtype=torch.float64)
        self.bin_confidence = torch.zeros(n_bins, dtype=torch.float64)
        self.bin_correct = torch.zeros(n_bins, dtype=torch.float64)
        self.sums = torch.zeros(2, dtype=torch.float64)  # NLL, Brier

    def update(self, probs: torch.Tensor, target: torch.Tensor, mapping: Sequence[int] | None = None) -> None:
        """Add probabilities (B, C, H, W) or (N, C) (rows sum to 1) and labels (B, H, W) or (N,), -1 ignored.

        With ``mapping`` the C columns are clusters mapped to ``n_classes`` classes (``n_classes`` must be set).
        """
        probs, target = _flatten(probs.detach(), target)
        if mapping is not None:
            if self.n_classes is None:
                raise ValueError("CalibrationAccumulator needs n_classes when a cluster mapping is given.")
            probs = map_to_classes(probs, mapping, self.n_classes)
            n_real = self.n_classes
        else:
            n_real = probs.shape[1]
        valid = (target >= 0) & (target < n_real)
        probs, target = probs[valid], target[valid]
        if target.numel() == 0:
            return
        confidence, pred = probs.max(dim=1)
        correct = (pred == target).double()
        # bin b holds confidences in (b/n, (b+1)/n]; confidence 0 joins the first bin
        bins = (torch.ceil(confidence * self.n_bins).long() - 1).clamp(0, self.n_bins - 1).cpu()
        self.bin_count += torch.bincount(bins, minlength=self.n_bins).double()
        self.bin_confidence += torch.bincount(bins, weights=confidence.cpu(), minlength=self.n_bins)
        self.bin_correct += torch.bincount(bins, weights=correct.cpu(), minlength=self.n_bins)
        p_true = probs.gather(1, target[:, None])[:, 0]
        onehot = torch.zeros_like(probs).scatter_(1, target[:, None], 1.0)
        self.sums[0] += float(-torch.log(p_true.clamp_min(self.eps)).sum())
        self.sums[1] += float(((probs - onehot) ** 2).sum())

    def all_reduce(self) -> CalibrationAccumulator:
        for t in (self.bin_count, self.bin_confidence, self.bin_correct, self.sums):
            sdist.all_reduce_sum(t)
        return self

    def compute(self) -> dict:
        """ece, mce, nll, brier, accuracy, n_pixels and bins {edges, count, confidence, accuracy}."""
        count = self.bin_count.numpy()
        n = count.sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            conf = self.bin_confidence.numpy() / count
            acc = self.bin_correct.numpy() / count
        gap = np.abs(acc - conf)
        nonempty = count > 0
        return {
            "ece": float((gap[nonempty] * count[nonempty]).sum() / n) if n else float("nan"),
            "mce": float(gap[nonempty].max()) if n else float("nan"),
            "nll": float(self.sums[0] / n) if n else float("nan"),
            "brier": float(self.sums[1] / n) if n else float("nan"),
            "accuracy": float(self.bin_correct.sum() / n) if n else float("nan"),
            "n_pixels": int(n),
            "bins": {"edges": np.linspace(0, 1, self.n_bins + 1).tolist(), "count": count.tolist(),
                     "confidence": [None if np.isnan(v) else float(v) for v in conf],
                     "accuracy": [None if np.isnan(v) else float(v) for v in acc]},
        }


def reliability_diagram(result: dict, path, title: str = "") -> None:
    """Bar chart of accuracy per confidence bin against the diagonal, from :meth:`CalibrationAccumulator.compute`."""
    bins = result["bins"]
    edges = np.asarray(bins["edges"])
    width = np.diff(edges)
    acc = np.array([np.nan if v is None else v for v in bins["accuracy"]])
    fig = Figure(figsize=(4, 4), dpi=100)
    ax = fig.subplots()
    ax.bar(edges[:-1], np.nan_to_num(acc), width=width, align="edge", edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title or f"ECE {100 * result['ece']:.2f}%  NLL {result['nll']:.3f}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, format="png")


class UncertaintyAccumulator:
    """Histograms of an uncertainty score for correct and wrong pixels over ``n_bins`` bins of ``value_range``.

    Scores outside the range fall into the first / last bin. AUROC treats wrong pixels as positives (higher
    uncertainty should mean wrong); ties within a bin count one half, so the binning error is at most the
    fraction of correct/wrong pairs sharing a bin.
    """

    def __init__(self, n_bins: int = 1000, value_range: tuple[float, float] = (0.0, 1.0)) -> None:
        lo, hi = value_range
        if not hi > lo:
            raise ValueError(f"value_range must be increasing, got {value_range}.")
        self.n_bins, self.lo, self.hi = n_bins, float(lo), float(hi)
        self.hist = torch.zeros(2, n_bins, dtype=torch.float64)  # row 0: correct, row 1: wrong

    def update(self, uncertainty: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
               mapping: Sequence[int] | None = None) -> None:
        """Add uncertainty (B, H, W), predictions (same shape; cluster ids when ``mapping`` is given) and labels
        (same shape, -1 ignored; a pixel in an unmatched cluster counts as wrong)."""
        u = uncertainty.detach().reshape(-1).double().cpu()
        pred = pred.detach().reshape(-1).long().cpu()
        target = target.reshape(-1).long().cpu()
        if not (u.numel() == pred.numel() == target.numel()):
            raise ValueError("uncertainty, pred and target must have the same number of pixels.")
        if mapping is not None:
            pred = torch.as_tensor(list(mapping), dtype=torch.long)[pred]
        valid = target >= 0
        u, wrong = u[valid], (pred[valid] != target[valid]).long()
        idx = ((u - self.lo) / (self.hi - self.lo) * self.n_bins).floor().long().clamp(0, self.n_bins - 1)
        self.hist += torch.bincount(wrong * self.n_bins + idx, minlength=2 * self.n_bins).reshape(2, -1).double()

    def all_reduce(self) -> UncertaintyAccumulator:
        sdist.all_reduce_sum(self.hist)
        return self

    def compute(self, fractions: Sequence[float] = tuple(np.linspace(0.0, 0.95, 20))) -> dict:
        """auroc, accuracy, n_pixels and rejection {fraction, accuracy}: accuracy of the pixels left after
        rejecting the given fraction of most uncertain ones (a bin is split proportionally)."""
        correct, wrong = self.hist[0].numpy(), self.hist[1].numpy()
        n_c, n_w = correct.sum(), wrong.sum()
        below_c = np.cumsum(correct) - correct  # correct pixels in strictly lower bins
        auroc = float((wrong * (below_c + 0.5 * correct)).sum() / (n_c * n_w)) if n_c and n_w else float("nan")
        n = n_c + n_w
        # keep the least uncertain pixels: walk bins from the lowest score upwards
        kept_total, kept_correct = np.cumsum(correct + wrong), np.cumsum(correct)
        curve = []
        for f in fractions:
            keep = (1.0 - f) * n
            b = int(np.searchsorted(kept_total, keep, side="left")) if n else 0
            if n == 0 or keep <= 0:
                curve.append(float("nan"))
                continue
            b = min(b, self.n_bins - 1)
            prev_total = kept_total[b - 1] if b else 0.0
            prev_correct = kept_correct[b - 1] if b else 0.0
            in_bin = correct[b] + wrong[b]
            share = (keep - prev_total) / in_bin if in_bin else 0.0
            curve.append(float((prev_correct + share * correct[b]) / keep))
        return {"auroc": auroc, "accuracy": float(n_c / n) if n else float("nan"), "n_pixels": int(n),
                "rejection": {"fraction": [float(f) for f in fractions], "accuracy": curve}}


def plot_rejection_curve(result: dict, path, title: str = "") -> None:
    """Accuracy vs fraction of most-uncertain pixels rejected, from :meth:`UncertaintyAccumulator.compute`."""
    rej = result["rejection"]
    fig = Figure(figsize=(4, 4), dpi=100)
    ax = fig.subplots()
    ax.plot(rej["fraction"], rej["accuracy"], marker="o", markersize=3)
    ax.set_xlabel("fraction of most uncertain pixels rejected")
    ax.set_ylabel("accuracy of the rest")
    ax.set_xlim(0, 1)
    ax.set_title(title or f"error-detection AUROC {result['auroc']:.3f}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, format="png")
