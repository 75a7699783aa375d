"""STEGO's correspondence loss against a hand-written loop reference (float64)."""

import math

import pytest
import torch

from stego.config import StegoConfig
from stego.losses import (
    CorrespondenceWeights,
    correspondence_loss,
    derangement,
    feature_correlation,
    pair_loss,
    sample_at,
)


def reference_pair_loss(f1, f2, c1, c2, shift, pointwise=True, zero_clamp=True, stabilize=False):
    """L(x, y; b) written out with explicit loops over batch and the four positions."""
    batch, _, s1, s2 = f1.shape
    _, _, t1, t2 = f2.shape

    def unit(v):
        return v / max(math.sqrt(float((v * v).sum())), 1e-10)

    corr = torch.zeros(batch, s1, s2, t1, t2, dtype=torch.float64)
    code = torch.zeros_like(corr)
    for b in range(batch):
        for i in range(s1):
            for j in range(s2):
                for k in range(t1):
                    for m in range(t2):
                        corr[b, i, j, k, m] = float((unit(f1[b, :, i, j]) * unit(f2[b, :, k, m])).sum())
                        code[b, i, j, k, m] = float((unit(c1[b, :, i, j]) * unit(c2[b, :, k, m])).sum())
    if pointwise:
        old_mean = corr.sum() / corr.numel()
        centred = torch.zeros_like(corr)
        for b in range(batch):
            for i in range(s1):
                for j in range(s2):
                    row_mean = corr[b, i, j].sum() / (t1 * t2)
                    centred[b, i, j] = corr[b, i, j] - row_mean
        corr = centred - centred.sum() / centred.numel() + old_mean
    total = 0.0
    for value_s, value_f in zip(code.flatten().tolist(), corr.flatten().tolist(), strict=True):
        if zero_clamp:
            value_s = max(value_s, 0.0)
        if stabilize:
            value_s = min(value_s, 0.8)
        total += -value_s * (value_f - shift)
    return total / corr.numel()


@pytest.mark.parametrize("pointwise,zero_clamp,stabilize", [(True, True, False), (False, True, False),
                                                            (True, False, False), (True, True, True)])
def test_pair_loss_matches_loop_reference(pointwise, zero_clamp, stabilize):
    gen = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(2, 5, 3, 3, generator=gen, dtype=torch.float64) + 0.3, torch.randn(
        2, 5, 2, 4, generator=gen, dtype=torch.float64)
    # Codes correlated with each other so that S spans both signs and exceeds 0.8 somewhere.
    c1 = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)
    c2 = c1.mean(dim=(2, 3), keepdim=True).expand(2, 4, 2, 4) + 0.3 * torch.randn(2, 4, 2, 4, generator=gen,
                                                                                  dtype=torch.float64)
    ours = pair_loss(f1, f2, c1, c2, 0.17, pointwise=pointwise, zero_clamp=zero_clamp, stabilize=stabilize)
    ref = reference_pair_loss(f1, f2, c1, c2, 0.17, pointwise, zero_clamp, stabilize)
    assert ours.dtype == torch.float64
    assert float(ours) == pytest.approx(ref, rel=1e-10, abs=1e-12)


def test_pointwise_centring_keeps_the_global_mean_and_zeroes_row_means():
    gen = torch.Generator().manual_seed(1)
    f1, f2 = torch.randn(3, 6, 4, 4, generator=gen, dtype=torch.float64), torch.randn(3, 6, 4, 4, generator=gen,
                                                                                       dtype=torch.float64)
    raw = feature_correlation(f1, f2, pointwise=False)
    centred = feature_correlation(f1, f2, pointwise=True)
    assert float(centred.mean()) == pytest.approx(float(raw.mean()), abs=1e-12)
    row_means = centred.mean(dim=(3, 4))
    assert torch.allclose(row_means, torch.full_like(row_means, float(raw.mean())), atol=1e-12)


def test_sample_at_reads_grid_corners_exactly():
    t = torch.arange(2 * 3 * 4 * 5, dtype=torch.float64).reshape(2, 3, 4, 5)
    grid = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    grid = grid.reshape(1, 2, 2, 2).expand(2, 2, 2, 2)  # (x, y) pairs
    out = sample_at(t, grid)
    assert torch.equal(out[:, :, 0, 0], t[:, :, 0, 0])
    assert torch.equal(out[:, :, 0, 1], t[:, :, -1, -1])
    assert torch.equal(out[:, :, 1, 0], t[:, :, 0, -1])
    assert torch.equal(out[:, :, 1, 1], t[:, :, -1, 0])
    # Outside [-1, 1] the border value is used.
    far = torch.full((2, 1, 1, 2), 3.0, dtype=torch.float64)
    assert torch.equal(sample_at(t, far)[:, :, 0, 0], t[:, :, -1, -1])


def test_total_loss_combines_terms_with_their_weights():
    gen = torch.Generator().manual_seed(2)
    feats, feats_knn = torch.randn(4, 6, 5, 5, generator=gen), torch.randn(4, 6, 5, 5, generator=gen)
    code, code_knn = torch.randn(4, 3, 5, 5, generator=gen), torch.randn(4, 3, 5, 5, generator=gen)
    weights = CorrespondenceWeights(0.3, 0.5, 0.7, 0.1, 0.2, 0.4)
    total, parts = correspondence_loss(feats, feats_knn, code, code_knn, weights, feature_samples=4, neg_samples=3,
                                       generator=torch.Generator().manual_seed(5))
    expected = 0.3 * parts["self"] + 0.5 * parts["knn"] + 0.7 * parts["rand"]
    assert float(total) == pytest.approx(float(expected), rel=1e-6)
    # Recompute the terms from the same random draws (same generator seed and order).
    g = torch.Generator().manual_seed(5)
    grid1 = torch.rand((4, 4, 4, 2), generator=g) * 2 - 1
    grid2 = torch.rand((4, 4, 4, 2), generator=g) * 2 - 1
    f1, c1 = sample_at(feats, grid1), sample_at(code, grid1)
    f2, c2 = sample_at(feats_knn, grid2), sample_at(code_knn, grid2)
    assert float(parts["self"]) == pytest.approx(float(pair_loss(f1, f1, c1, c1, 0.1)), rel=1e-6)
    assert float(parts["knn"]) == pytest.approx(float(pair_loss(f1, f2, c1, c2, 0.2)), rel=1e-6)
    rand = []
    for _ in range(3):
        perm = derangement(4, generator=g)
        # The partner of image b is image perm[b], read at grid row perm[b].
        rand.append(float(pair_loss(f1, sample_at(feats, grid2)[perm], c1, sample_at(code, grid2)[perm], 0.4)))
    assert float(parts["rand"]) == pytest.approx(sum(rand) / 3, rel=1e-6)


def test_feature_side_carries_no_gradient():
    feats = torch.randn(2, 4, 3, 3, requires_grad=True)
    code = torch.randn(2, 3, 3, 3, requires_grad=True)
    weights = StegoConfig().loss_weights()
    total, _ = correspondence_loss(feats, feats, code, code, weights, feature_samples=3, neg_samples=1)
    total.backward()
    assert feats.grad is None
    assert code.grad is not None and torch.isfinite(code.grad).all() and code.grad.abs().sum() > 0


@pytest.mark.parametrize("n", [2, 3, 5, 16])
def test_derangements_have_no_fixed_point(n):
    gen = torch.Generator().manual_seed(n)
    seen = set()
    for _ in range(300):
        perm = derangement(n, generator=gen)
        assert sorted(perm.tolist()) == list(range(n))
        assert not (perm == torch.arange(n)).any()
        seen.add(tuple(perm.tolist()))
    if n == 3:
        assert len(seen) == 2  # both derangements of 3 elements occur
    if n == 5:
        assert len(seen) == 44  # all derangements of 5 elements occur in 300 draws
    if n == 16:
        assert len(seen) == 300


def test_derangement_of_one_image_is_a_clear_error():
    with pytest.raises(ValueError, match="batch of at least 2"):
        derangement(1)
