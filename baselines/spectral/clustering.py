"""Weighted spherical k-means over segment descriptors: the step that names classes across the dataset.

Each descriptor is a unit vector weighted by its segment's token count, so a large segment counts as much as the
tokens it covers (what k-means on the tokens themselves would weigh). Restarts are seeded; the restart with the
lowest weighted inertia wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DescriptorClusters:
    centres: torch.Tensor  # (K, C), unit norm
    labels: torch.Tensor  # (M,) int64: the cluster of each descriptor
    inertia: float  # sum of weight * (1 - cos(descriptor, its centre))


def _kmeanspp(x: torch.Tensor, weights: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding with the cosine distance, each draw proportional to weight * distance: (K, C)."""
    first = torch.multinomial(weights, 1, generator=generator)
    centres = [x[first[0]]]
    distance = (1 - x @ centres[0]).clamp_min(0)
    for _ in range(1, k):
        mass = weights * distance
        # All remaining points coincide with a centre: any point will do (duplicates are re-seeded below).
        mass = mass if float(mass.sum()) > 0 else weights
        centres.append(x[torch.multinomial(mass, 1, generator=generator)[0]])
        distance = torch.minimum(distance, (1 - x @ centres[-1]).clamp_min(0))
    return torch.stack(centres)


def _lloyd(x: torch.Tensor, weights: torch.Tensor, centres: torch.Tensor, max_iter: int,
           tol: float) -> DescriptorClusters:
    previous = float("inf")
    for _ in range(max_iter):
        best, labels = (x @ centres.T).max(dim=1)
        inertia = float((weights * (1 - best)).sum())
        sums = torch.zeros_like(centres).index_add_(0, labels, x * weights[:, None])
        empty = torch.bincount(labels, minlength=len(centres)) == 0
        if bool(empty.any()):  # re-seed an empty cluster at the worst-served descriptors, so K survive
            worst = torch.argsort(best)[: int(empty.sum())]
            sums[empty] = x[worst]
        centres = F.normalize(sums, dim=1)
        if previous - inertia <= tol * max(inertia, 1.0) and not bool(empty.any()):
            break
        previous = inertia
    best, labels = (x @ centres.T).max(dim=1)
    return DescriptorClusters(centres, labels, float((weights * (1 - best)).sum()))


def cluster_descriptors(descriptors: torch.Tensor, weights: torch.Tensor, k: int, *, n_init: int = 5,
                        max_iter: int = 100, seed: int = 0, tol: float = 1e-6) -> DescriptorClusters:
    """Fit K unit centres to descriptors (M, C) with positive weights (M,); restart r is seeded with seed + r."""
    if descriptors.shape[0] < k:
        raise ValueError(f"n_clusters={k} but only {descriptors.shape[0]} non-empty segments were found in the "
                         "training features; lower n_clusters, or raise n_segments or the resolution.")
    x = F.normalize(descriptors.float(), dim=1)
    w = weights.float()
    best: DescriptorClusters | None = None
    for restart in range(n_init):
        generator = torch.Generator().manual_seed(seed + restart)
        result = _lloyd(x, w, _kmeanspp(x, w, k, generator), max_iter, tol)
        if best is None or result.inertia < best.inertia:
            best = result
    return best
