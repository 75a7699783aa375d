"""SegUnify's objectives (pure functions).

Correspondence (trains the compressor; the STEGO-style objective, written for this method): for two images x, y
with features f and codes c read at random positions,

    Fc = cos(f_x, f_y), centred per position of x over the positions of y (the global mean added back), no grad
    S  = cos(c_x, c_y), clamped at 0 from below
    L(x, y; b) = -mean(S * (Fc - b))

summed over three partners: the image itself, one of its k nearest neighbours and random other images of the
batch, each with its own weight and shift b.

Labeler (trains the local centres): cross-entropy of the local cosine logits against the global centres' argmax
(the agreement loss, which keeps the class identities of the local centres tied to the slow global ones) plus the
cosine k-means energy -mean_tokens max_k cos(code, local_k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PartnerTerm:
    """Weight and shift b of one partner's term (no defaults: the paper values live in the config)."""

    weight: float
    shift: float


def unit(t: torch.Tensor) -> torch.Tensor:
    """L2-normalise over channels (dim 1)."""
    return F.normalize(t, dim=1, eps=1e-10)


def read_at(t: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of t (B, C, h, w) at coords (B, S, S, 2) in [-1, 1] (x, y order) -> (B, C, S, S)."""
    return F.grid_sample(t, coords, mode="bilinear", padding_mode="border", align_corners=True)


def pair_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Channel inner products of every position pair: a (B, C, S, S), b (B, C, S, S) -> (B, S, S, S, S)."""
    return torch.einsum("bcij,bckl->bijkl", a, b)


@torch.no_grad()
def centred_feature_similarity(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """Fc of unit features (B, C, S, S): each position of the first image has its mean over the second image's
    positions removed, then the overall mean is added back so the shift b keeps its scale. (B, S, S, S, S)."""
    sim = pair_similarity(f1, f2)
    overall = sim.mean()
    centred = sim - sim.mean(dim=(3, 4), keepdim=True)
    return centred - centred.mean() + overall


def partner_loss(f1: torch.Tensor, f2: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, shift: float) -> torch.Tensor:
    """L(x, y; b) on unit features f (B, C, S, S) and unit codes c (B, D, S, S) -> scalar."""
    code_sim = pair_similarity(c1, c2).clamp(min=0)
    return -(code_sim * (centred_feature_similarity(f1, f2) - shift)).mean()


def cyclic_derangement(n: int, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """A permutation of range(n) without fixed points, drawn in one pass: a random order, each element sent to the
    next one in it (a single n-cycle). LongTensor (n,); n >= 2."""
    if n < 2:
        raise ValueError(f"random partners need a batch of at least 2 images (got {n}); raise batch_size.")
    order = torch.randperm(n, generator=generator, device=device)
    partner = torch.empty_like(order)
    partner[order] = order.roll(-1)
    return partner


def correspondence_loss(feats: torch.Tensor, feats_knn: torch.Tensor, code: torch.Tensor, code_knn: torch.Tensor,
                        terms: dict[str, PartnerTerm], *, n_samples: int, n_random: int,
                        generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the self, kNN and random-partner terms.

    Args:
        feats, feats_knn: backbone features (B, C, h, w) of the images and of their kNN partners.
        code, code_knn: their codes (B, D, h, w).
        terms: {"self", "knn", "random"} -> PartnerTerm.
        n_samples: S, the side of the S x S grid of random positions read from each image.
        n_random: how many random derangements of the batch are averaged for the random term (0 = none).
        generator: the source of positions and derangements (seeded per step by the caller).
    Returns (total, {"self", "knn", "random"}: detached scalars).
    """
    batch, device = feats.shape[0], feats.device
    grids = [torch.rand((batch, n_samples, n_samples, 2), generator=generator, device=device) * 2 - 1
             for _ in range(2)]
    f1, c1 = unit(read_at(feats, grids[0])), unit(read_at(code, grids[0]))
    f_knn, c_knn = unit(read_at(feats_knn, grids[1])), unit(read_at(code_knn, grids[1]))
    parts = {"self": partner_loss(f1, f1, c1, c1, terms["self"].shift),
             "knn": partner_loss(f1, f_knn, c1, c_knn, terms["knn"].shift)}
    random_terms = []
    if n_random > 0:
        f2, c2 = unit(read_at(feats, grids[1])), unit(read_at(code, grids[1]))
        for _ in range(n_random):
            other = cyclic_derangement(batch, generator, device)
            random_terms.append(partner_loss(f1, f2[other], c1, c2[other], terms["random"].shift))
    parts["random"] = torch.stack(random_terms).mean() if random_terms else code.new_zeros(())
    total = sum(terms[name].weight * value for name, value in parts.items())
    return total, {name: value.detach() for name, value in parts.items()}


def labeler_loss(local_scores: torch.Tensor, global_scores: torch.Tensor, *, temperature: float,
                 energy_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Agreement cross-entropy plus weighted cosine k-means energy, averaged over the local sets.

    local_scores: (n_sets, B, K, h, w) cosines to the local centres; global_scores: (B, K, h, w) to the global
    ones (their argmax is the target, no gradient). Returns (total, {"agreement", "energy"} detached).
    """
    target = global_scores.detach().argmax(dim=1)  # (B, h, w)
    agreement = torch.stack([F.cross_entropy(scores / temperature, target) for scores in local_scores]).mean()
    energy = -local_scores.max(dim=2).values.mean()
    total = agreement + energy_weight * energy
    return total, {"agreement": agreement.detach(), "energy": energy.detach()}
