"""EAGLE's losses (pure functions): the object-centric contrastive loss with medoid prototypes, the modified
correspondence loss with adaptive shifts, and the schedule between them.

Notation: Z the projected, L2-normalised codes of one view (tokens × D, tokens of the whole batch), Z̃ those of
the other view, F a feature correlation (no gradient), S a code correlation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def schedule(step: int, switch_step: int, limit: float) -> float:
    """u of the total loss: 0 up to and including `switch_step` (0-based steps), then `limit`."""
    return float(limit) if step > switch_step else 0.0


# ------------------------------------------------------------------------------------------ object-centric


def medoid_prototypes(tokens: torch.Tensor, segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One prototype per segment: the member minimising the summed Euclidean distance to the other members.

    tokens (T, D), segments (T,) integer ids -> (prototypes (S, D), targets (T,) in [0, S)), S the number of
    distinct ids, in increasing id order. The prototypes are rows of `tokens` (the gradient flows through them);
    the choice of the member does not carry a gradient.
    """
    ids, targets = torch.unique(segments, sorted=True, return_inverse=True)
    chosen = []
    with torch.no_grad():
        for s in range(len(ids)):
            members = torch.nonzero(targets == s).flatten()
            distances = torch.cdist(tokens[members], tokens[members]).sum(dim=0)  # (n_s,)
            chosen.append(members[distances.argmin()])
    return tokens[torch.stack(chosen)], targets


def smoothed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Per-row cross-entropy (T,) of logits (T, S) against targets (T,), with the original's label smoothing:
    weight 1 − s on the target and s / (S − 1) on every other class."""
    if smoothing == 0.0:
        return F.cross_entropy(logits, targets, reduction="none")
    log_prob = F.log_softmax(logits, dim=-1)
    weight = torch.full_like(log_prob, smoothing / max(logits.shape[-1] - 1, 1))
    weight.scatter_(-1, targets.unsqueeze(-1), 1.0 - smoothing)
    return -(weight * log_prob).sum(dim=-1)


def token_weights(signal: torch.Tensor) -> torch.Tensor:
    """Row means of the normalised feature correlation: signal (B, C, h, w) -> (B·h·w,).

    As the original: corr = Fᵀ F per image (N × N), each column L2-normalised, then the mean of each row.
    """
    flat = signal.flatten(2)  # (B, C, N)
    corr = F.normalize(flat.transpose(1, 2) @ flat, dim=1)  # (B, N, N)
    return corr.mean(dim=2).reshape(-1)


def object_centric_loss(z: torch.Tensor, z_other: torch.Tensor, segments: torch.Tensor, weights: torch.Tensor, *,
                        temperature: float = 0.07, global_weight: float = 0.7,
                        smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_obj of one direction.

    z, z_other: (T, D) unit rows of this view and of the other view (same tokens); segments (T,) EiCue ids of this
    view; weights (T,) token weights. local = CE(z·Pᵀ/τ), global = CE(z̃·Pᵀ/τ), P the medoids of z per segment;
    returns ((1 − g)·local + g·global) / 2 and the two terms (detached).
    """
    prototypes, targets = medoid_prototypes(z, segments)
    local = (smoothed_cross_entropy(z @ prototypes.T / temperature, targets, smoothing) * weights).mean()
    glob = (smoothed_cross_entropy(z_other @ prototypes.T / temperature, targets, smoothing) * weights).mean()
    total = ((1.0 - global_weight) * local + global_weight * glob) / 2
    return total, {"local": local.detach(), "global": glob.detach()}


# ------------------------------------------------------------------------------------------ correspondence


@dataclass(frozen=True)
class CorrespondenceSettings:
    """Weights and shifts of the modified correspondence loss (the paper's values live in `EagleConfig`)."""

    lambda_pos: float
    lambda_neg: float
    shift_bias: float
    shift_value: float
    feature_samples: int
    neg_samples: int
    pointwise: bool = True
    zero_clamp: bool = True
    stabilize: bool = True


def _norm(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, dim=1, eps=1e-10)


def _sample(t: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear read of t (B, C, h, w) at grid (B, S, S, 2) in [-1, 1] -> (B, C, S, S)."""
    return F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nchw,ncij->nhwij", a, b)


def pair_loss(f1: torch.Tensor, f2: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, settings: CorrespondenceSettings,
              positive: bool) -> torch.Tensor:
    """One term on sampled features f (B, C, S, S) and codes c (B, D, S, S) -> scalar.

    The shift adapts to the batch: positive |mean F − mean S − b|, negative (mean F + mean S − b)·shift_value; S
    carries its gradient into the shift as in the original. S is clamped at 0 (zero_clamp) and 0.8 (stabilize).
    """
    with torch.no_grad():
        fd = _correlation(_norm(f1), _norm(f2))
        if settings.pointwise:
            old_mean = fd.mean()
            fd = fd - fd.mean(dim=(3, 4), keepdim=True)
            fd = fd - fd.mean() + old_mean
    cd = _correlation(_norm(c1), _norm(c2))
    if positive:
        shift = torch.abs(fd.mean() - cd.mean() - settings.shift_bias)
    else:
        shift = (fd.mean() + cd.mean() - settings.shift_bias) * settings.shift_value
    low = 0.0 if settings.zero_clamp else None
    high = 0.8 if settings.stabilize else None
    return -(cd.clamp(min=low, max=high) * (fd - shift)).mean()


def near_derangement(n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
                     ) -> torch.Tensor:
    """The original's `super_perm`: a random permutation whose fixed points are moved one place on (no image is
    paired with itself; the map need not stay a permutation). (n,) int64, n >= 2."""
    if n < 2:
        raise ValueError(f"the correspondence loss needs a batch of at least 2 images for its negatives (got {n}); "
                         "increase batch_size.")
    perm = torch.randperm(n, generator=generator, device=device)
    perm[perm == torch.arange(n, device=device)] += 1
    return perm % n


def correspondence_loss(signal: torch.Tensor, signal_aug: torch.Tensor, code: torch.Tensor, code_aug: torch.Tensor,
                        settings: CorrespondenceSettings,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """λ_pos·pos + λ_neg·neg: the positive pair (x_aug, x) and `neg_samples` pairs (x, x[perm]).

    signal, signal_aug: dropped-out features (B, C, h, w) of x and x_aug; code, code_aug: their codes (B, D, h, w).
    Three independent sampling grids as the original: x_aug at grid 3 against x at grid 2 (positive), x at grid 1
    against the permuted batch's samples at grid 2 (negatives).
    """
    batch, device, size = signal.shape[0], signal.device, settings.feature_samples
    grids = [torch.rand((batch, size, size, 2), device=device, dtype=signal.dtype, generator=generator) * 2 - 1
             for _ in range(3)]
    f1, c1 = _sample(signal, grids[0]), _sample(code, grids[0])
    f2, c2 = _sample(signal, grids[1]), _sample(code, grids[1])
    f3, c3 = _sample(signal_aug, grids[2]), _sample(code_aug, grids[2])
    pos = pair_loss(f3, f2, c3, c2, settings, positive=True)
    negs = []
    for _ in range(settings.neg_samples):
        # The partner of image b is image perm[b] read at grid row perm[b] (the samples f2, c2 are reused); the
        # original read image perm[b] at row b. Both rows are independent uniform grids, so the loss has the
        # same distribution, without re-sampling the full (B, C, h, w) features five times.
        perm = near_derangement(batch, generator, device)
        negs.append(pair_loss(f1, f2[perm], c1, c2[perm], settings, positive=False))
    neg = torch.stack(negs).mean() if negs else code.new_zeros(())
    total = settings.lambda_pos * pos + settings.lambda_neg * neg
    return total, {"pos": pos.detach(), "neg": neg.detach()}
