"""Cluster probe (hard cosine k-means) and linear probe, shared by every method.

Both are trained on the *detached* code by the caller (``probe(code.detach())``), each with its own optimiser,
so they measure the code without shaping it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClusterProbe(nn.Module):
    """``n_classes + n_extra`` learnable centres scored by cosine similarity.

    ``inner = <normalize(code), normalize(centre)>`` (B, K', h, w); the training loss is hard cosine k-means
    ``-(onehot(argmax inner) * inner).sum(clusters).mean()``; the logits are ``alpha * inner`` so that
    ``softmax(logits)`` are the evaluation probabilities.
    """

    def __init__(self, code_dim: int, n_classes: int, n_extra: int = 0, alpha: float = 2.0) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.n_extra = n_extra
        self.alpha = alpha
        self.centres = nn.Parameter(torch.randn(n_classes + n_extra, code_dim))

    @property
    def n_clusters(self) -> int:
        return self.centres.shape[0]

    def inner(self, code: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every pixel to every centre: code (B, D, h, w) -> (B, K', h, w)."""
        return torch.einsum("bdhw,kd->bkhw", F.normalize(code, dim=1), F.normalize(self.centres, dim=1))

    def forward(self, code: torch.Tensor, alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """code (B, D, h, w) -> (loss scalar, logits (B, K', h, w)); ``alpha`` defaults to ``self.alpha``."""
        inner = self.inner(code)
        hard = F.one_hot(inner.argmax(dim=1), self.n_clusters).permute(0, 3, 1, 2).to(inner.dtype)
        loss = -(hard * inner).sum(dim=1).mean()
        return loss, (self.alpha if alpha is None else alpha) * inner


class LinearProbe(nn.Module):
    """1x1 convolution code -> class logits, trained with cross-entropy on labelled pixels."""

    def __init__(self, code_dim: int, n_classes: int) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.conv = nn.Conv2d(code_dim, n_classes, kernel_size=1)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        """code (B, D, h, w) -> logits (B, K, h, w)."""
        return self.conv(code)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of logits (B, K, h, w) bilinearly upsampled to labels (B, H, W); -1 (and any label
        outside ``[0, K)``) is ignored. Returns 0 (with a gradient path) when no pixel is labelled."""
        labels = labels.long()
        labels = torch.where((labels >= 0) & (labels < self.n_classes), labels, torch.full_like(labels, -1))
        up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        if not (labels >= 0).any():
            return up.sum() * 0.0
        return F.cross_entropy(up, labels, ignore_index=-1)
