"""STEGO's contrastive correlation loss (pure functions).

Notation follows the paper: F is the feature correlation (no gradient), S the code correlation, b a shift.
For an image pair (x, y):  L(x, y; b) = mean( -clamp(S, min=0) * (F - b) ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CorrespondenceWeights:
    """Weights λ and shifts b of the three loss terms (self, kNN partner, random derangement).

    No defaults here: the paper's values live in one place, `stego.config.StegoConfig`.
    """

    lambda_self: float
    lambda_knn: float
    lambda_rand: float
    shift_self: float
    shift_knn: float
    shift_rand: float


def l2_normalize(t: torch.Tensor) -> torch.Tensor:
    """L2-normalise over channels (dim 1) with the original's eps 1e-10."""
    return F.normalize(t, dim=1, eps=1e-10)


def random_grid(batch: int, size: int, *, device: torch.device | str = "cpu",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Random sampling coordinates uniform in [-1, 1]: (B, S, S, 2) in grid_sample's (x, y) order."""
    return torch.rand((batch, size, size, 2), device=device, generator=generator) * 2 - 1


def sample_at(t: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear read of t (B, C, h, w) at grid (B, S, S, 2) -> (B, C, S, S)."""
    return F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=True)


def tensor_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (B, C, h, w), b (B, C, k, l) -> (B, h, w, k, l): channel inner product of every position pair."""
    return torch.einsum("bchw,bckl->bhwkl", a, b)


def feature_correlation(f1: torch.Tensor, f2: torch.Tensor, pointwise: bool = True,
                        normalized: bool = False) -> torch.Tensor:
    """F of two sampled feature maps (B, C, S, S) -> (B, S, S, S, S), without gradient.

    Pointwise centring subtracts, for each position of the first image, the mean over the second image's
    positions, then adds back the global mean from before, so the shift b keeps its original scale.
    `normalized=True` skips the L2 normalisation when the caller has done it already.
    """
    with torch.no_grad():
        if not normalized:
            f1, f2 = l2_normalize(f1), l2_normalize(f2)
        corr = tensor_correlation(f1, f2)
        if pointwise:
            global_mean = corr.mean()
            corr = corr - corr.mean(dim=(3, 4), keepdim=True)
            corr = corr - corr.mean() + global_mean
    return corr


def pair_loss(f1: torch.Tensor, f2: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, shift: float, *,
              pointwise: bool = True, zero_clamp: bool = True, stabilize: bool = False,
              normalized: bool = False) -> torch.Tensor:
    """L(x, y; b) on sampled features f (B, C, S, S) and codes c (B, D, S, S) -> scalar.

    zero_clamp clamps S at 0 from below (on by default); stabilize also clamps it at 0.8 from above.
    `normalized=True` means f and c are already L2-normalised over channels.
    """
    feat_corr = feature_correlation(f1, f2, pointwise, normalized=normalized)
    if not normalized:
        c1, c2 = l2_normalize(c1), l2_normalize(c2)
    code_corr = tensor_correlation(c1, c2)
    low = 0.0 if zero_clamp else None
    high = 0.8 if stabilize else None
    if low is not None or high is not None:
        code_corr = code_corr.clamp(min=low, max=high)
    return -(code_corr * (feat_corr - shift)).mean()


def derangement(n: int, *, device: torch.device | str = "cpu",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly random permutation of range(n) with no fixed point: LongTensor (n,).

    Rejection sampling (about e tries on average); n >= 2 is required since n = 1 has no derangement.
    """
    if n < 2:
        raise ValueError(f"derangement needs a batch of at least 2 images (got {n}); increase batch_size.")
    identity = torch.arange(n, device=device)
    while True:
        perm = torch.randperm(n, device=device, generator=generator)
        if not bool((perm == identity).any()):
            return perm


def correspondence_loss(signal: torch.Tensor, signal_knn: torch.Tensor, code: torch.Tensor,
                        code_knn: torch.Tensor, weights: CorrespondenceWeights, *, feature_samples: int = 11,
                        neg_samples: int = 5, pointwise: bool = True, zero_clamp: bool = True,
                        stabilize: bool = False,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The full STEGO correspondence loss.

    Args:
        signal, signal_knn: feature signals (B, C, h, w) of the images and of their kNN partners.
        code, code_knn: codes (B, D, h, w) of the same.
    Returns:
        (total, parts) with total = λ_self·L(x, x) + λ_knn·L(x, x_knn) + λ_rand·mean_r L(x, x_perm_r) and
        parts = {"self", "knn", "rand"} (detached scalars).
    """
    batch, device = signal.shape[0], signal.device
    grid1 = random_grid(batch, feature_samples, device=device, generator=generator)
    grid2 = random_grid(batch, feature_samples, device=device, generator=generator)

    def read(feats: torch.Tensor, code: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Normalised once here rather than in every pair term: (B, C, S, S), (B, D, S, S).
        return l2_normalize(sample_at(feats, grid)), l2_normalize(sample_at(code, grid))

    f1, c1 = read(signal, code, grid1)
    f2, c2 = read(signal_knn, code_knn, grid2)
    opts = dict(pointwise=pointwise, zero_clamp=zero_clamp, stabilize=stabilize, normalized=True)

    loss_self = pair_loss(f1, f1, c1, c1, weights.shift_self, **opts)  # same grid, as in the original
    loss_knn = pair_loss(f1, f2, c1, c2, weights.shift_knn, **opts)
    rand_terms = []
    if neg_samples > 0:
        # Each image read once at grid2 and then permuted: the partner of image b is image perm[b] at the grid
        # row perm[b]. The original read image perm[b] at row b; both are independent uniform coordinates.
        f3, c3 = read(signal, code, grid2)
        for _ in range(neg_samples):
            perm = derangement(batch, device=device, generator=generator)
            rand_terms.append(pair_loss(f1, f3[perm], c1, c3[perm], weights.shift_rand, **opts))
    loss_rand = torch.stack(rand_terms).mean() if rand_terms else code.new_zeros(())

    total = weights.lambda_self * loss_self + weights.lambda_knn * loss_knn + weights.lambda_rand * loss_rand
    parts = {"self": loss_self.detach(), "knn": loss_knn.detach(), "rand": loss_rand.detach()}
    return total, parts
