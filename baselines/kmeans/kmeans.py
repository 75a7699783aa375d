"""Cosine (spherical) k-means on L2-normalised feature vectors, with seeded restarts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class KMeansResult:
    centres: torch.Tensor  # (K, C), unit norm
    labels: torch.Tensor  # (N,) int64
    inertia: float  # sum over points of (1 - cos(point, its centre))
    n_iter: int


def assign(x: torch.Tensor, centres: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre by cosine: x (N, C) and centres (K, C) unit norm -> (labels (N,), best cos (N,))."""
    labels, best = [], []
    for start in range(0, x.shape[0], chunk):
        sims = x[start:start + chunk] @ centres.T  # (n, K)
        value, index = sims.max(dim=1)
        labels.append(index)
        best.append(value)
    return torch.cat(labels), torch.cat(best)


def init_centres(x: torch.Tensor, k: int, method: str, generator: torch.Generator) -> torch.Tensor:
    """k-means++ (D² sampling with the cosine distance 1 - cos) or k random distinct points: (K, C)."""
    n = x.shape[0]
    if method == "random":
        return x[torch.randperm(n, generator=generator)[:k]].clone()
    if method != "k-means++":
        raise ValueError(f"unknown k-means init {method!r}; use 'k-means++' or 'random'.")
    centres = [x[torch.randint(n, (1,), generator=generator)].squeeze(0)]
    dist = (1 - x @ centres[0]).clamp_min(0)  # (N,)
    for _ in range(1, k):
        weights = dist if float(dist.sum()) > 0 else torch.ones_like(dist)
        index = torch.multinomial(weights, 1, generator=generator)
        centres.append(x[index].squeeze(0))
        dist = torch.minimum(dist, (1 - x @ centres[-1]).clamp_min(0))
    return torch.stack(centres)


def _single_run(x: torch.Tensor, k: int, init: str, max_iter: int, tol: float,
                generator: torch.Generator) -> KMeansResult:
    centres = init_centres(x, k, init, generator)
    previous, n_iter = float("inf"), 0
    for _ in range(max_iter):
        n_iter += 1
        labels, best = assign(x, centres)
        inertia = float((1 - best).sum())
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            # Re-seed empty clusters at the worst-served points so K clusters survive.
            worst = torch.argsort(best)[:len(empty)]
            sums[empty] = x[worst]
        centres = F.normalize(sums, dim=1)
        if previous - inertia <= tol * max(inertia, 1.0) and not len(empty):  # previous = inf never stops
            break
        previous = inertia
    labels, best = assign(x, centres)
    return KMeansResult(centres, labels, float((1 - best).sum()), n_iter)


def cosine_kmeans(x: torch.Tensor, k: int, *, n_init: int = 5, max_iter: int = 100, init: str = "k-means++",
                  seed: int = 0, tol: float = 1e-6) -> KMeansResult:
    """Fit spherical k-means on x (N, C); keep the restart with the lowest inertia.

    x is L2-normalised here (float32). Restart r uses a generator seeded with `seed + r`.
    """
    if x.ndim != 2:
        raise ValueError(f"cosine_kmeans expects (N, C) vectors, got shape {tuple(x.shape)}.")
    if x.shape[0] < k:
        raise ValueError(f"cosine_kmeans needs at least k={k} vectors but got {x.shape[0]}; lower n_clusters or "
                         "raise max_samples.")
    x = F.normalize(x.float(), dim=1)
    best: KMeansResult | None = None
    for restart in range(n_init):
        result = _single_run(x, k, init, max_iter, tol, torch.Generator().manual_seed(seed + restart))
        if best is None or result.inertia < best.inertia:
            best = result
    return best
