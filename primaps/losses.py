"""PriMaPs-EM losses and the EM's closed-form pieces (pure functions).

Shapes: logits / similarities (B, K, H, W); pseudo-masks (B, H, W) int64 with 0 = background, 1..M = masks;
labels (B, H, W) int64 with `IGNORE` = no label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -1


def hard_cosine_kmeans_loss(similarities: torch.Tensor) -> torch.Tensor:
    """Warm-up loss of θ_M: `-(onehot(argmax_k s) * s).sum(k).mean()` over similarities (B, K, h, w)."""
    hard = F.one_hot(similarities.argmax(dim=1), similarities.shape[1]).permute(0, 3, 1, 2).to(similarities.dtype)
    return -(hard * similarities).sum(dim=1).mean()


def focal_class_weights(logits: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """w_c = (1 - mean over the batch's pixels of softmax(logits)_c) ** gamma, (K,), no gradient."""
    mean_confidence = logits.detach().softmax(dim=1).mean(dim=(0, 2, 3))
    return (1.0 - mean_confidence) ** gamma


def focal_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """M-step loss: class-weighted cross-entropy with the focal weights, IGNORE pixels skipped.

    As the original, the per-pixel weighted losses are averaged over *all* pixels (ignored ones count as 0), not
    normalised by the weights. A batch without any target pixel gives 0 (with a gradient path).
    """
    weights = focal_class_weights(logits, gamma)
    per_pixel = F.cross_entropy(logits, targets, weight=weights, ignore_index=IGNORE, reduction="none")
    return per_pixel.mean()


def majority_vote(predictions: torch.Tensor, masks: torch.Tensor, n_classes: int) -> torch.Tensor:
    """E-step: every mask's pixels get the class θ_M predicts most often inside it; background -> IGNORE.

    predictions (B, H, W) int64 in [0, K); masks (B, H, W) int64, 0 = background. Ties go to the smallest class
    (as `torch.mode`). Returns (B, H, W) int64.
    """
    batch = predictions.shape[0]
    n_masks = int(masks.max()) + 1 if masks.numel() else 1
    slot = (torch.arange(batch, device=masks.device).view(-1, 1, 1) * n_masks + masks) * n_classes + predictions
    counts = torch.bincount(slot.reshape(-1), minlength=batch * n_masks * n_classes).view(batch, n_masks, n_classes)
    winner = counts.argmax(dim=2)  # (B, M + 1): the first maximum, i.e. the smallest class among ties
    labels = torch.gather(winner, 1, masks.reshape(batch, -1)).view_as(masks)
    return torch.where(masks > 0, labels, torch.full_like(labels, IGNORE))


def ema_decay(update: int, decay: float = 0.98, warmup: bool = True) -> float:
    """Decay of the `update`-th EMA update (1-based).

    With `warmup` (the original's EMA class with its defaults): the first two updates copy θ_R (decay 0), then
    `1 - 1/(update - 1)`, capped at `decay`. Without: always `decay`.
    """
    if not warmup:
        return decay
    if update <= 2:
        return 0.0
    return min(decay, 1.0 - 1.0 / (update - 1))


@torch.no_grad()
def ema_update_(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * source, parameter by parameter, in place."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
