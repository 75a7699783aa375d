"""Segmentation metrics: confusion histograms, Hungarian matching, Acc / mIoU.

The histogram is ``stats[pred, gt]`` of shape ``(n_clusters, n_classes)``; pixels whose ground truth is
outside ``[0, n_classes)`` are dropped. Unsupervised scores match clusters to classes with the Hungarian
algorithm (maximising matched pixels); the linear probe uses the identity mapping.

Clusters left without a class by the matching (``n_clusters > n_classes``) are handled by an explicit
``extra_policy``, and every score dict says which one produced it:

- ``"error"`` (default): pixels predicted as an unmatched cluster count as wrong.
- ``"majority"``: each unmatched cluster is mapped to its majority ground-truth class (as PriMaPs does).
- ``"drop"``: pixels predicted as an unmatched cluster are removed from the totals (compatibility only).
- ``"stego"``: exact compatibility with the original STEGO code (``UnsupervisedMetrics`` in its ``utils.py``),
  which drops every pixel predicted as a cluster id ``>= n_classes`` *before* matching. With extra clusters it
  then matches on the transposed histogram (classes as rows, every cluster a column), which breaks ties
  differently from matching the clusters as rows; and it pools the pixels of any cluster left unmatched into
  one more histogram row and column, a pseudo-class whose IoU (0) enters the mean.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from shared import dist as sdist

EXTRA_POLICIES = ("error", "majority", "drop", "stego")
MATCHINGS = ("hungarian", "identity")


def confusion_histogram(pred: torch.Tensor, target: torch.Tensor, n_clusters: int, n_classes: int) -> torch.Tensor:
    """Count ``stats[pred, gt]`` over pixels with ``0 <= gt < n_classes``.

    Args:
        pred: integer predictions of any shape, e.g. ``(B, H, W)``, values in ``[0, n_clusters)``.
        target: integer labels of the same shape (-1 or any out-of-range value = ignore).
    Returns:
        int64 tensor ``(n_clusters, n_classes)`` on ``pred``'s device.
    """
    pred = torch.as_tensor(pred)
    target = torch.as_tensor(target, device=pred.device)
    if pred.shape != target.shape:
        raise ValueError(f"Prediction shape {tuple(pred.shape)} differs from label shape {tuple(target.shape)}; "
                         "upsample the prediction to the label size first.")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    valid = (target >= 0) & (target < n_classes)
    pred, target = pred[valid], target[valid]
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= n_clusters):
        raise ValueError(f"Predictions must lie in [0, {n_clusters}) but range over [{int(pred.min())}, "
                         f"{int(pred.max())}]; pass the right n_clusters (including extra clusters).")
    flat = torch.bincount(pred * n_classes + target, minlength=n_clusters * n_classes)
    return flat.reshape(n_clusters, n_classes)


def hungarian_match(histogram: np.ndarray | torch.Tensor) -> np.ndarray:
    """One-to-one cluster -> class assignment maximising the matched pixel count.

    Args:
        histogram: ``(n_clusters, n_classes)`` counts ``stats[pred, gt]``.
    Returns:
        int64 array ``(n_clusters,)``: the class of each cluster, -1 for clusters left unmatched.
    """
    stats = np.asarray(torch.as_tensor(histogram).cpu().numpy(), dtype=np.float64)
    rows, cols = linear_sum_assignment(stats, maximize=True)
    mapping = np.full(stats.shape[0], -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def stego_match(histogram: np.ndarray | torch.Tensor) -> np.ndarray:
    """The original STEGO code's cluster -> class assignment (same return as :func:`hungarian_match`).

    Without extra clusters it matches the square histogram as is; with extra clusters it solves the transposed
    problem (classes as rows). Both give an optimal assignment, but when several are optimal scipy picks a
    different one depending on which side are the rows, and the scores follow the original only if we pick its.
    """
    stats = np.asarray(torch.as_tensor(histogram).cpu().numpy(), dtype=np.float64)
    n_clusters, n_classes = stats.shape
    if n_clusters <= n_classes:
        return hungarian_match(stats)
    classes, clusters = linear_sum_assignment(stats.T, maximize=True)
    mapping = np.full(n_clusters, -1, dtype=np.int64)
    mapping[clusters] = classes
    return mapping


def _identity_mapping(n_clusters: int, n_classes: int) -> np.ndarray:
    mapping = np.arange(n_clusters, dtype=np.int64)
    mapping[mapping >= n_classes] = -1
    return mapping


def _apply_extra_policy(stats: np.ndarray, mapping: np.ndarray, policy: str) -> tuple[np.ndarray, np.ndarray]:
    """Resolve unmatched clusters; returns (mapping, row mask of clusters whose pixels are kept)."""
    mapping = mapping.copy()
    unmatched = mapping < 0
    keep = np.ones(len(mapping), dtype=bool)
    if policy == "majority":
        mapping[unmatched] = stats[unmatched].argmax(axis=1)
    elif policy == "drop":
        keep = ~unmatched
    return mapping, keep


def _mean_iou(iou: np.ndarray, unmatched_pixels: float, policy: str) -> float:
    """Percent mean over the classes that occur; NaN when none does."""
    if policy == "stego" and unmatched_pixels > 0:
        # The original adds the pixels of unmatched clusters as one more row (and an empty column) of its
        # class histogram: a pseudo-class with IoU 0 that it averages in with the real ones.
        iou = np.append(iou, 0.0)
    return 100.0 * float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan")


def scores_from_histogram(histogram: np.ndarray | torch.Tensor, matching: str = "hungarian",
                          extra_policy: str = "error") -> dict:
    """Acc and mIoU (percent) from a ``(n_clusters, n_classes)`` histogram.

    Returns a dict with ``acc``, ``miou``, ``iou`` (list per class, NaN for a class absent from both
    prediction and ground truth), ``mapping`` (list cluster -> class, -1 unmatched; after the policy),
    ``n_pixels`` (pixels in the totals), ``n_dropped`` (pixels removed by the policy), ``matching`` and
    ``extra_policy``.
    """
    if matching not in MATCHINGS:
        raise ValueError(f"Unknown matching {matching!r}; use one of {MATCHINGS}.")
    if extra_policy not in EXTRA_POLICIES:
        raise ValueError(f"Unknown extra_policy {extra_policy!r}; use one of {EXTRA_POLICIES}.")
    stats = torch.as_tensor(histogram).cpu().numpy().astype(np.float64)
    n_clusters, n_classes = stats.shape
    total_before = stats.sum()
    if extra_policy == "stego":
        # The original masks out predictions >= n_classes before the histogram is built.
        stats = stats.copy()
        stats[n_classes:] = 0
    if matching == "identity":
        mapping = _identity_mapping(n_clusters, n_classes)
    elif extra_policy == "stego":
        mapping = stego_match(stats)  # the zeroed extra clusters stay in the problem, as in the original
    else:
        mapping = hungarian_match(stats)
    mapping, keep = _apply_extra_policy(stats, mapping, extra_policy)
    stats = stats[keep]
    kept_mapping = mapping[keep]
    # Class confusion: rows = predicted class, columns = gt; unmatched clusters predict no class at all.
    class_stats = np.zeros((n_classes, n_classes), dtype=np.float64)
    for cluster_row, cls in zip(stats, kept_mapping, strict=True):
        if cls >= 0:
            class_stats[cls] += cluster_row
    tp = np.diag(class_stats)
    fp = class_stats.sum(axis=1) - tp
    fn = stats.sum(axis=0) - tp  # every kept gt pixel not predicted as its class, unmatched ones included
    denom = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)
    total = stats.sum()
    acc = 100.0 * tp.sum() / total if total > 0 else float("nan")
    miou = _mean_iou(iou, unmatched_pixels=stats[kept_mapping < 0].sum(), policy=extra_policy)
    return {
        "acc": float(acc),
        "miou": miou,
        "iou": [float(100.0 * v) for v in iou],
        "mapping": [int(m) for m in mapping],
        "n_pixels": int(total),
        "n_dropped": int(total_before - total),
        "matching": matching,
        "extra_policy": extra_policy,
    }


class ConfusionAccumulator:
    """Running ``stats[pred, gt]`` histogram, summed across DDP ranks by :meth:`all_reduce`."""

    def __init__(self, n_clusters: int, n_classes: int) -> None:
        if n_clusters < 1 or n_classes < 1:
            raise ValueError(f"n_clusters ({n_clusters}) and n_classes ({n_classes}) must be positive.")
        self.n_clusters = n_clusters
        self.n_classes = n_classes
        self.histogram = torch.zeros(n_clusters, n_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` cluster ids and ``target`` labels of the same shape, e.g. ``(B, H, W)``."""
        hist = confusion_histogram(pred, target, self.n_clusters, self.n_classes)
        if self.histogram.device != hist.device:
            self.histogram = self.histogram.to(hist.device)
        self.histogram += hist

    def all_reduce(self) -> ConfusionAccumulator:
        """Sum the histogram over ranks (call once, on every rank, before :meth:`compute`)."""
        sdist.all_reduce_sum(self.histogram)
        return self

    def reset(self) -> None:
        self.histogram.zero_()

    def compute(self, matching: str = "hungarian", extra_policy: str = "error") -> dict:
        """Scores of :func:`scores_from_histogram` for the accumulated histogram."""
        return scores_from_histogram(self.histogram, matching=matching, extra_policy=extra_policy)


def segmentation_scores(pred: torch.Tensor, target: torch.Tensor, n_classes: int, n_clusters: int | None = None,
                        matching: str = "hungarian", extra_policy: str = "error") -> dict:
    """One-call scores for predictions ``pred`` (cluster ids) against ``target`` (same shape, -1 ignore).

    ``n_clusters`` defaults to ``n_classes``. See :func:`scores_from_histogram` for the keys.
    """
    n_clusters = n_classes if n_clusters is None else n_clusters
    acc = ConfusionAccumulator(n_clusters, n_classes)
    acc.update(pred, target)
    return acc.compute(matching=matching, extra_policy=extra_policy)
