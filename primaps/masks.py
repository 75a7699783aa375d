"""Principal mask proposals (PriMaPs): decompose one image's features into masks, one principal direction at a time.

    raw = principal_mask_proposals(features)            # (C, h, w) -> (M, h, w), before any post-processing
    logits = mask_log_probs(raw)                        # (M + 1, h, w): median filter, gain, background, log-softmax

The algorithm (Hahn et al., 2024, Sec. 3.1). Every position starts unassigned. While fewer than `coverage` of the
positions are assigned:
1. `v` = the first principal direction of the unassigned features (the top eigenvector of their covariance);
2. `sim = <v, n(f)>` on unassigned positions, 0 elsewhere (n = L2 normalisation over channels);
3. nearest-neighbour refinement: `v = n(f)` at the argmax of `sim`, `sim` recomputed the same way;
4. `sim < threshold * max(sim)` is zeroed and `sim` divided by its maximum; its support is the next mask and
   becomes assigned.
The loop also stops when the assigned set has not changed over the last 3 iterations (checked from the 4th on).

Deviations from the original code, all deliberate:
- The direction is computed exactly, to float32 precision (ARPACK's top eigenpair of the C x C covariance, or of
  the n x n Gram matrix when fewer positions than channels remain: `top_eigenpair`) instead of
  `torch.pca_lowrank(q=3, niter=100)`, which is randomised and about 10x slower. Its sign, which decides which
  end of the axis the refinement starts from, is fixed by `SIGN_RULE` instead of being left to chance.
- An iteration whose refined similarity has no positive maximum (every unassigned feature is a zero vector) adds
  no mask; the original appended a 0/0 = NaN mask. It still counts for the 3-iteration rule, so the loop ends.
- Features without a principal direction (zero variance, e.g. constant features) skip step 1: the refinement then
  starts from the first unassigned position, which is what any direction gives when all the features are equal,
  so constant features become one mask covering the whole image.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.sparse.linalg
import torch
import torch.nn.functional as F

THRESHOLD, COVERAGE, PATIENCE, GAIN = 0.4, 0.95, 3, 10.0
SIGN_RULE = "the direction is oriented towards the sum of the unassigned normalised features (<v, sum n(f)> >= 0)"
_RELATIVE_EIGEN_FLOOR = 1e-10  # top eigenvalue below this fraction of the mean squared norm = no direction
_ARPACK_MIN_SIZE = 8  # ARPACK needs a few more dimensions than eigenpairs; below this LAPACK is as fast anyway


def _check_features(features: torch.Tensor) -> None:
    if features.dim() != 3:
        raise ValueError(f"features must be (C, h, w), got shape {tuple(features.shape)}.")
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values; check the feature cache (delete it to rebuild) "
                         "or the base segmenter's code.")


def top_eigenpair(matrix: np.ndarray) -> tuple[float, np.ndarray]:
    """Largest eigenvalue and its unit eigenvector (size,) of a symmetric PSD matrix.

    ARPACK (implicitly restarted Lanczos, to machine precision, from a fixed start vector so that it is
    deterministic) needs only matrix-vector products: about 7x faster than LAPACK's `evx` for one eigenpair of a
    384 x 384 covariance, which must tridiagonalise the whole matrix first. Tiny matrices, a zero matrix and the
    rare case where ARPACK does not converge go to `evx`.
    """
    size = matrix.shape[0]
    if size > _ARPACK_MIN_SIZE:
        start = np.random.default_rng(0).standard_normal(size).astype(matrix.dtype)
        try:
            value, vector = scipy.sparse.linalg.eigsh(matrix, k=1, which="LA", v0=start, tol=0)
            return float(value[0]), vector[:, 0]
        except scipy.sparse.linalg.ArpackError:  # no convergence, or a zero matrix (A v0 = 0)
            pass
    value, vector = scipy.linalg.eigh(matrix, subset_by_index=[size - 1, size - 1], driver="evx")
    return float(value[0]), vector[:, 0]


def top_direction(x: torch.Tensor, normed: torch.Tensor) -> torch.Tensor | None:
    """The first principal direction (C,) of the rows of x (n, C), oriented by `SIGN_RULE`; None without variance.

    `normed` (n, C) are the rows L2-normalised (for the sign). Exact: the top eigenpair of the centred covariance
    (C x C) or of the centred Gram matrix (n x n, mapped back through x^T) when n < C.
    """
    # float32 throughout: the direction is exact to float32 precision, and a float64 covariance alone would cost
    # about as much as the eigensolver
    centred = x.float() - x.float().mean(dim=0, keepdim=True)
    n, c = centred.shape
    small = centred @ centred.T if n < c else centred.T @ centred
    value, vector = top_eigenpair(small.numpy())
    scale = float((centred * centred).sum()) / max(n, 1)
    if n < 2 or value <= _RELATIVE_EIGEN_FLOOR * max(scale, 1e-30):
        return None
    v = torch.from_numpy(vector)
    if n < c:  # Gram eigenvector u -> covariance eigenvector x^T u
        v = centred.T @ v
    v = F.normalize(v, dim=0)
    if float(normed.float().sum(dim=0) @ v) < 0:
        v = -v
    return v.to(x.dtype)


def _one_mask(flat: torch.Tensor, normed: torch.Tensor, free: torch.Tensor, threshold: float) -> torch.Tensor:
    """One proposal (P,) over positions `free` (P,) bool; all zeros when the refined similarity has no positive max."""
    v = top_direction(flat[free], normed[free])
    if v is None:  # no principal direction: every direction gives equal similarities, the first one wins
        start = int(torch.nonzero(free)[0])
    else:
        # -inf off the free set: the original zeroed it, so an all-negative free set started from an assigned point
        start = int(torch.where(free, normed @ v, torch.full((), -float("inf"))).argmax())
    sim = torch.where(free, normed @ normed[start], torch.zeros(()))
    peak = sim.max()
    if not peak > 0:
        return torch.zeros_like(sim)
    sim = torch.where(sim < threshold * peak, torch.zeros(()), sim)
    return sim / peak


def principal_mask_proposals(features: torch.Tensor, *, threshold: float = THRESHOLD, coverage: float = COVERAGE,
                             patience: int = PATIENCE, max_masks: int | None = None) -> torch.Tensor:
    """Raw PriMaPs of one image: features (C, h, w) float -> masks (M, h, w) float in extraction order.

    Each mask is the refined similarity divided by its maximum on its support, 0 elsewhere; masks are disjoint.
    Stops at `coverage` assigned, when the assigned set is unchanged over the last `patience` iterations, or
    after `max_masks` masks. ValueError for NaN / infinite features.
    """
    _check_features(features)
    c, h, w = features.shape
    flat = features.detach().float().cpu().reshape(c, h * w).T.contiguous()  # (P, C)
    normed = F.normalize(flat, dim=1)
    free = torch.ones(h * w, dtype=torch.bool)
    masks, history = [], []
    while (~free).sum().item() / free.numel() < coverage:
        mask = _one_mask(flat, normed, free, threshold)
        if mask.max() > 0:
            masks.append(mask)
            free = free & ~(mask > 0)
        history.append(free.clone())
        if max_masks is not None and len(masks) >= max_masks:
            break
        if len(history) > patience and all(torch.equal(history[-1], past) for past in history[-patience:]):
            break
    if not masks:
        return torch.zeros(0, h, w)
    return torch.stack(masks).reshape(-1, h, w)


def median_filter3(masks: torch.Tensor) -> torch.Tensor:
    """3 x 3 median filter of every mask (M, h, w), reflect padding (as the original's MedianPool2d)."""
    padded = F.pad(masks[None], (1, 1, 1, 1), mode="reflect")[0]
    windows = padded.unfold(1, 3, 1).unfold(2, 3, 1)  # (M, h, w, 3, 3)
    return windows.reshape(*masks.shape, 9).median(dim=-1).values


def mask_log_probs(raw: torch.Tensor, gain: float = GAIN) -> torch.Tensor:
    """Raw masks (M, h, w) -> log-probabilities (M + 1, h, w), channel 0 the background.

    Median filter, x gain and clamp to [0, 1]; background `clamp(mean(nonzero filtered values) - sum(masks), 0, 1)`;
    log-softmax over the channels. With no mask (or a filter that erased every mask) the background is 0 too and
    all channels are equal.
    """
    if raw.shape[0] == 0:
        return torch.zeros(1, *raw.shape[1:])
    smooth = (median_filter3(raw.float()) * gain).clamp(0, 1)
    nonzero = smooth[smooth != 0]
    level = nonzero.mean() if nonzero.numel() else torch.zeros(())
    background = (level - smooth.sum(dim=0, keepdim=True)).clamp(0, 1)
    return F.log_softmax(torch.cat([background, smooth]), dim=0)

