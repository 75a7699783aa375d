"""PriMaPs-EM modules (no I/O, no distributed calls): the cosine class prototypes and the exported head.

Both classifiers of the EM, the momentum prototypes θ_M and the trained prototypes θ_R, are `CosinePrototypes`:
a 1x1 convolution without bias whose weight is normalised per class with unit gain, applied to L2-normalised
inputs, so a logit is the cosine between a pixel and a class prototype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def upsample(features: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of (B, C, h, w) features to `size`, as the original before its heads."""
    size = (size, size) if isinstance(size, int) else size
    if tuple(features.shape[-2:]) == tuple(size):
        return features
    return F.interpolate(features, size=size, mode="bilinear", align_corners=False)


class CosinePrototypes(nn.Module):
    """K prototypes in a C-dimensional space: x (B, C, h, w) -> cos(x, prototype_k) (B, K, h, w)."""

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, dim))  # the direction only: the gain is fixed at 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        cos = F.normalize(self.weight, dim=1) @ F.normalize(x.reshape(b, c, h * w), dim=1)  # (B, K, h * w)
        return cos.reshape(b, -1, h, w)


class PrimapsEvalHead(nn.Module):
    """The exported head: backbone features -> {code, cluster_logits, linear_logits}.

    `base` (optional) is the "+SotA" base segmenter, whose `code` is the space the EM ran in; without it the code
    is the backbone features themselves. cluster_logits = alpha * cos(code, θ_M), the momentum prototypes.
    """

    def __init__(self, prototypes: CosinePrototypes, linear_probe: nn.Module, alpha: float,
                 base: nn.Module | None = None) -> None:
        super().__init__()
        self.prototypes, self.linear_probe, self.base = prototypes, linear_probe, base
        self.alpha = float(alpha)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        code = self.base(features)["code"] if self.base is not None else features  # (B, D, h, w)
        return {"code": code, "cluster_logits": self.alpha * self.prototypes(code),
                "linear_logits": self.linear_probe(code)}
