"""Uncertainty-aware spatial smoothing, PU-SegNet's post-processing in place of a CRF.

For ``iterations`` rounds, every pixel whose variance is above the image's ``percentile`` of variance gets
the weighted mean of the probabilities of its ``window x window`` neighbourhood (itself included), with weights

    w_ij = exp(-|n(h_i) - n(h_j)|^2 / sigma^2) / (v_j + eps)      (n = L2 normalisation of the backbone features)

so that similar and confident neighbours dominate; every other pixel keeps its probabilities. Written with
``unfold`` and ``torch.quantile`` so that it exports with dynamic batch, height and width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def neighbourhood(x: torch.Tensor, window: int) -> torch.Tensor:
    """x (B, C, h, w) -> (B, C, window^2, h, w): each pixel's neighbourhood, zero outside the image."""
    b, c, h, w = x.shape
    cols = F.unfold(x, kernel_size=window, padding=window // 2)  # (B, C * window^2, h * w)
    return cols.reshape(b, c, window * window, h, w)


def neighbour_cosines(unit: torch.Tensor, window: int) -> torch.Tensor:
    """<u_i, u_j> (B, window^2, h, w) for unit vectors u (B, C, h, w), 0 outside the image; one shifted product
    per offset instead of unfolding all C channels (window^2 times less memory)."""
    h, w = unit.shape[-2:]
    r = window // 2
    padded = F.pad(unit, (r, r, r, r))
    return torch.stack([(padded[:, :, dy:dy + h, dx:dx + w] * unit).sum(dim=1)
                        for dy in range(window) for dx in range(window)], dim=1)


def smoothing_weights(features: torch.Tensor, variance: torch.Tensor, window: int, sigma: float,
                      eps: float) -> torch.Tensor:
    """w_ij (B, window^2, h, w) for every pixel i and neighbour j; 0 for neighbours outside the image."""
    unit = F.normalize(features.float(), dim=1)  # (B, C, h, w)
    cosine = neighbour_cosines(unit, window)  # (B, window^2, h, w)
    distance2 = (2.0 - 2.0 * cosine).clamp_min(0.0)  # |a - b|^2 of unit vectors
    inside = neighbourhood(torch.ones_like(variance[:, None]), window)[:, 0]  # (B, window^2, h, w)
    confidence = 1.0 / (neighbourhood(variance[:, None], window)[:, 0] + eps)
    return torch.exp(-distance2 / (sigma * sigma)) * confidence * inside


def uncertain_mask(variance: torch.Tensor, percentile: float) -> torch.Tensor:
    """(B, h, w) bool: the pixels whose variance is above the image's ``percentile`` (0-100) of variance."""
    flat = variance.flatten(1)
    threshold = torch.quantile(flat, percentile / 100.0, dim=1, keepdim=True)
    return (flat > threshold).reshape(variance.shape)


def uncertainty_aware_smoothing(probs: torch.Tensor, variance: torch.Tensor, features: torch.Tensor, *,
                                iterations: int = 5, percentile: float = 70.0, window: int = 3, sigma: float = 0.5,
                                eps: float = 1e-3) -> torch.Tensor:
    """Smoothed probabilities (B, K, h, w) from probabilities (B, K, h, w), variance (B, h, w) and the backbone
    features (B, C, h, w) the head read. Confident pixels (at or below the percentile) are returned unchanged."""
    if window % 2 != 1:
        raise ValueError(f"smooth_window must be odd (3 or 5), got {window}.")
    weights = smoothing_weights(features, variance, window, sigma, eps)  # fixed over the iterations
    weights = weights / weights.sum(dim=1, keepdim=True)  # the centre pixel is inside, so the sum is > 0
    update = uncertain_mask(variance, percentile)[:, None]  # (B, 1, h, w)
    for _ in range(iterations):
        mean = (neighbourhood(probs, window) * weights[:, None]).sum(dim=2)  # (B, K, h, w)
        probs = torch.where(update, mean, probs)
    return probs
