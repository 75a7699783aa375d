"""The deep spectral baseline's exported head: per-image eigendecomposition, segments, and class names.

    features (B, C, h, w)
      -> segments (B, h*w): per-image spectral segmentation (`baselines.spectral.spectral`)
      -> descriptor of each segment: mean of its L2-normalised tokens, L2-normalised (B, S, C)
      -> code (B, C, h, w): each token carries its segment's descriptor
      -> cluster_logits (B, K, h, w) = alpha * cos(code, centres), centres fitted by k-means over the training
         set's segment descriptors

Every token of a segment gets the same logits, so a segment is named as a whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from baselines.spectral.spectral import segment_means, spectral_segments


class SpectralHead(nn.Module):
    """features -> {code, cluster_logits}; the eigendecomposition runs inside (torch.linalg.eigh)."""

    def __init__(self, centres: torch.Tensor, *, n_eigenvectors: int, n_segments: int, segment_iters: int,
                 spatial_sigma: float, alpha: float) -> None:
        super().__init__()
        self.register_buffer("centres", F.normalize(centres.detach().float(), dim=1))  # (K, C)
        self.n_eigenvectors, self.n_segments, self.segment_iters = n_eigenvectors, n_segments, segment_iters
        self.spatial_sigma, self.alpha = float(spatial_sigma), float(alpha)

    def segments(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h*w) segment ids."""
        return spectral_segments(features, n_eigenvectors=self.n_eigenvectors, n_segments=self.n_segments,
                                 n_iter=self.segment_iters, spatial_sigma=self.spatial_sigma)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        b, c, h, w = features.shape
        segments = self.segments(features)  # (B, n)
        descriptors, _ = segment_means(features, segments, self.n_segments)  # (B, S, C)
        one_hot = F.one_hot(segments, self.n_segments).to(descriptors.dtype)  # (B, n, S)
        code = torch.bmm(one_hot, descriptors).transpose(1, 2).reshape(b, c, h, w)  # (B, C, h, w)
        logits = self.alpha * torch.einsum("bchw,kc->bkhw", code, self.centres)
        return {"code": code, "cluster_logits": logits}
