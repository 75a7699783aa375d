"""PU-SegNet's losses (pure functions): confidence-weighted cross-entropy on the base segmenter's pseudo-labels,
and the similarity loss between backbone-feature similarity and the agreement of predicted distributions.

    l_final = sum_i c_i CE(z_i, y_i) / sum_i c_i  +  lambda_sim * mean_(i,j) -(F_ij - b) <p_i, p_j>

with c_i the pseudo-label confidence, F_ij the (pointwise-centred) cosine similarity of the backbone features of
pixels i and j, p = softmax(z). The README proves the similarity loss's bounds, its bounded gradient and its
block-structured minimiser; tests/pusegnet/test_losses.py checks them numerically.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def confidence_weighted_ce(logits: torch.Tensor, pseudo: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
    """sum_i c_i CE(logits_i, pseudo_i) / sum_i c_i over pixels.

    logits (B, K, h, w); pseudo (B, h, w) int cluster ids; confidence (B, h, w) in [0, 1]. Normalising by the
    confidence sum (not the pixel count) makes the term independent of the base's overall confidence scale
    (STEGO's cluster softmax at alpha = 2 is far from one everywhere).
    """
    ce = F.cross_entropy(logits, pseudo.long(), reduction="none")  # (B, h, w)
    weight = confidence.to(ce.dtype)
    return (weight * ce).sum() / weight.sum().clamp_min(1e-12)


def feature_similarity(feats_a: torch.Tensor, feats_b: torch.Tensor, pointwise: bool = True) -> torch.Tensor:
    """F (B, N, M): cosine similarity of sampled features (B, C, N) and (B, C, M), no gradient.

    ``pointwise`` centres each row over j and restores the global mean (STEGO's pointwise centring), which
    keeps a per-pixel offset (a bright pixel similar to everything) from reading as agreement.
    """
    with torch.no_grad():
        sim = torch.einsum("bcn,bcm->bnm", F.normalize(feats_a.float(), dim=1), F.normalize(feats_b.float(), dim=1))
        if pointwise:
            sim = sim - sim.mean(dim=2, keepdim=True) + sim.mean()
    return sim


def similarity_loss(similarity: torch.Tensor, probs_a: torch.Tensor, probs_b: torch.Tensor,
                    shift: float) -> torch.Tensor:
    """mean_(n, m) -(F_nm - b) <p_n, p_m> for F (B, N, M), probabilities (B, K, N) and (B, K, M).

    Bounded: with F in [F_lo, F_hi] the value lies in [min(0, b - F_hi), max(0, b - F_lo)] (for cosines
    without centring, [b - 1, b + 1] when |b| <= 1).
    """
    agreement = torch.einsum("bkn,bkm->bnm", probs_a, probs_b)  # in [0, 1]
    return -((similarity - shift) * agreement).mean()


def sample_positions(batch: int, height: int, width: int, n_samples: int, generator: torch.Generator,
                     device: torch.device) -> torch.Tensor:
    """(B, n_samples) random flat pixel indices per image, drawn from ``generator`` (with replacement)."""
    return torch.randint(height * width, (batch, n_samples), generator=generator).to(device)


def gather_pixels(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (B, C, h, w), positions (B, N) -> (B, C, N)."""
    flat = x.flatten(2)
    return flat.gather(2, positions[:, None].expand(-1, flat.shape[1], -1))


def pair_similarity_loss(features: torch.Tensor, logits: torch.Tensor, positions: torch.Tensor, shift: float,
                         pointwise: bool = True) -> torch.Tensor:
    """The similarity loss over pixel pairs within each image and across images (image b with image b+1 of the
    batch, a derangement). features (B, C, h, w), logits (B, K, h, w), positions (B, N) sampled pixels."""
    feats = gather_pixels(features, positions)  # (B, C, N)
    probs = torch.softmax(gather_pixels(logits, positions), dim=1)  # (B, K, N)
    within = similarity_loss(feature_similarity(feats, feats, pointwise), probs, probs, shift)
    if features.shape[0] < 2:
        return within
    other_feats, other_probs = feats.roll(1, dims=0), probs.roll(1, dims=0)
    across = similarity_loss(feature_similarity(feats, other_feats, pointwise), probs, other_probs, shift)
    return 0.5 * (within + across)
