"""Synthetic "cached features" whose patches carry the classes, for STEGO's training tests.

Each image has a blocky class map; a patch's feature is its class prototype, plus a per-image "style" vector
shared by all patches of the image (a nuisance that dominates raw cosine similarity), plus noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class FakeCachedFeatures:
    """Stands in for `shared.data.feature_cache.CachedFeatures`."""

    features: np.ndarray  # float16 (N, C, h, w)
    labels: np.ndarray  # int16 (N, R, R)
    key: str = "synthetic"
    meta: dict | None = None

    def __len__(self) -> int:
        return len(self.features)


def make_synthetic(n_images: int = 32, n_classes: int = 4, dim: int = 24, grid: int = 8, block: int = 4,
                   label_scale: int = 2, style: float = 0.0, noise: float = 0.25, seed: int = 0,
                   flip: bool = False) -> FakeCachedFeatures:
    gen = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(n_classes, dim, generator=gen), dim=1)
    coarse = torch.randint(n_classes, (n_images, grid // block, grid // block), generator=gen)
    labels = coarse.repeat_interleave(block, 1).repeat_interleave(block, 2)  # (N, h, w)
    styles = style * F.normalize(torch.randn(n_images, dim, 1, 1, generator=gen), dim=1)
    feats = prototypes[labels].permute(0, 3, 1, 2) + styles + noise * torch.randn(n_images, dim, grid, grid,
                                                                                  generator=gen)
    big_labels = labels.repeat_interleave(label_scale, 1).repeat_interleave(label_scale, 2)
    if flip:
        feats, big_labels = feats.flip(-1), big_labels.flip(-1)
    return FakeCachedFeatures(feats.numpy().astype(np.float16), big_labels.numpy().astype(np.int16))


def knn_of(cached: FakeCachedFeatures, k: int = 8) -> np.ndarray:
    """(N, k) nearest images by cosine of mean features, self first (like the kNN files)."""
    pooled = F.normalize(torch.from_numpy(cached.features.astype(np.float32)).mean(dim=(2, 3)), dim=1)
    sims = pooled @ pooled.T
    sims.fill_diagonal_(2.0)  # self first
    return sims.topk(k, dim=1).indices.numpy().astype(np.int64)
