"""Where the labeler's centres start: cosine k-means on the code of the first batch (pure functions).

The slides initialise the centres Xavier-normal. On the planted-class benchmark, random directions fall into
k-means' local minima (two centres share a class, one class is split) in about 1 seed in 6, and the EMA/agreement
loop then keeps that partition; seeding the directions from the data (k-means++ then a few Lloyd iterations on the
first batch's tokens) avoided it in every seed we tried. The Xavier-normal draw still sets each centre's length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding with the cosine distance: unit rows x (N, D) -> (K, D) rows of x."""
    chosen = [int(torch.randint(x.shape[0], (1,), generator=generator, device=x.device))]
    distance = (1 - x @ x[chosen[0]]).clamp_min(0)
    for _ in range(1, k):
        mass = distance if float(distance.sum()) > 0 else torch.ones_like(distance)
        chosen.append(int(torch.multinomial(mass, 1, generator=generator)))
        distance = torch.minimum(distance, (1 - x @ x[chosen[-1]]).clamp_min(0))
    return x[chosen]


def kmeans_directions(tokens: torch.Tensor, k: int, *, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Unit centre directions (K, D) from tokens (N, D): k-means++ seeds, then `iters` spherical Lloyd steps.

    A centre that loses all its tokens keeps its direction.
    """
    if tokens.shape[0] < k:
        raise ValueError(f"{k} clusters but the first batch holds only {tokens.shape[0]} tokens; raise batch_size or "
                         "resolution, or lower n_extra_clusters.")
    x = F.normalize(tokens.float(), dim=1)
    centres = kmeans_plus_plus(x, k, generator)
    for _ in range(iters):
        assignment = (x @ centres.T).argmax(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, assignment, x)
        used = torch.bincount(assignment, minlength=k) > 0
        centres = torch.where(used[:, None], F.normalize(sums, dim=1), centres)
    return centres
