"""Mask proposals: planted regions are recovered, the two stopping rules, a float64 reference of the original
algorithm (same direction signs), the post-processing against hand computations, and bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from primaps.masks import mask_log_probs, median_filter3, principal_mask_proposals


def planted(n_regions=3, dim=16, h=12, w=12, noise=0.05, seed=0):
    """Features whose positions belong to `n_regions` vertical stripes, each with its own direction."""
    gen = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(n_regions, dim, generator=gen), dim=1)
    regions = (torch.arange(w) * n_regions // w).expand(h, w)  # (h, w) stripe ids
    feats = protos[regions].permute(2, 0, 1) + noise * torch.randn(dim, h, w, generator=gen)
    return feats, regions


def iou(a, b):
    return float((a & b).sum()) / float((a | b).sum())


def reference_proposals(features, threshold=0.4, coverage=0.95, patience=3):
    """The original loop in float64, with the direction from a full eigendecomposition oriented by the same rule."""
    c, h, w = features.shape
    feat = features.double().reshape(c, -1)
    normed = F.normalize(feat, dim=0)
    free = torch.ones(h * w, dtype=torch.bool)
    masks, memory = [], []
    while (~free).sum() / free.numel() < coverage:
        x = feat[:, free].T
        xc = x - x.mean(0)
        _, vecs = torch.linalg.eigh(xc.T @ xc)
        v = vecs[:, -1]
        if (normed[:, free].sum(1) @ v) < 0:
            v = -v
        sim = v @ normed
        sim[~free] = -float("inf")
        v = normed[:, sim.argmax()]
        sim = v @ normed
        sim[~free] = 0
        sim[sim < threshold * sim.max()] = 0
        sim = sim / sim.max()
        masks.append(sim.clone())
        free[sim > 0] = False
        memory.insert(0, free.clone())
        if len(memory) > patience:
            memory.pop()
            if all(torch.equal(memory[0], m) for m in memory):
                break
    return torch.stack(masks).reshape(-1, h, w)


def test_planted_regions_are_recovered():
    feats, regions = planted()
    masks = principal_mask_proposals(feats)
    assert masks.shape[1:] == regions.shape
    for r in range(3):
        best = max(iou(m > 0, regions == r) for m in masks)
        assert best >= 0.9, (r, best)


def test_masks_are_normalised_and_disjoint():
    feats, _ = planted(seed=1)
    masks = principal_mask_proposals(feats)
    assert torch.allclose(masks.amax(dim=(1, 2)), torch.ones(len(masks)))
    assert int((masks > 0).sum(0).max()) == 1  # no position in two masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_float64_reference_of_the_original(seed):
    feats, _ = planted(n_regions=4, dim=24, noise=0.3, seed=seed)  # noisy: many masks, many iterations
    ours, ref = principal_mask_proposals(feats), reference_proposals(feats)
    assert ours.shape == ref.shape
    assert torch.equal(ours > 0, ref > 0)
    assert torch.allclose(ours.double(), ref, atol=1e-4)


def test_stops_at_coverage():
    # 10 x 10 positions, 2 regions: one mask per region covers everything; a 95% rule would stop after them.
    feats, regions = planted(n_regions=2, h=10, w=10, noise=0.0)
    masks = principal_mask_proposals(feats)
    assert len(masks) == 2
    # coverage 0.5: the first mask (one stripe, half the image) is already enough
    assert len(principal_mask_proposals(feats, coverage=0.5)) == 1


def test_stalls_are_stopped_by_the_three_iteration_rule():
    # Two planted stripes on 80% of the image, zero vectors on the rest: after the two masks no iteration can
    # assign anything (the refined similarity has no positive maximum), coverage stays at 80% < 95%.
    feats, regions = planted(n_regions=2, h=10, w=10, noise=0.0)
    feats[:, 8:, :] = 0.0
    masks = principal_mask_proposals(feats)
    assert len(masks) == 2
    covered = (masks > 0).any(0)
    assert int(covered.sum()) == 80 and not covered[8:].any()


def test_constant_features_give_one_whole_image_mask():
    masks = principal_mask_proposals(torch.ones(5, 4, 6) * 3.0)
    assert masks.shape == (1, 4, 6) and torch.equal(masks, torch.ones(1, 4, 6))


def test_nan_features_are_an_error():
    feats = torch.randn(4, 5, 5)
    feats[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        principal_mask_proposals(feats)


def test_median_filter_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 5, 6, generator=gen)
    padded = F.pad(x[None], (1, 1, 1, 1), mode="reflect")[0]
    expected = torch.empty_like(x)
    for m in range(2):
        for i in range(5):
            for j in range(6):
                expected[m, i, j] = padded[m, i:i + 3, j:j + 3].flatten().sort().values[4]
    assert torch.equal(median_filter3(x), expected)


def test_log_probs_by_hand():
    # Two constant masks (median filter keeps them): gain 10 clamps 0.05 -> 0.5 and 0.5 -> 1.
    raw = torch.zeros(2, 4, 4)
    raw[0, :, :2], raw[1, :, 2:] = 0.05, 0.5
    out = mask_log_probs(raw)
    level = (0.5 * 8 + 1.0 * 8) / 16  # mean of the non-zero filtered values
    left = torch.tensor([max(0.0, level - 0.5), 0.5, 0.0])
    right = torch.tensor([max(0.0, level - 1.0), 0.0, 1.0])
    assert torch.allclose(out[:, 0, 0], torch.log_softmax(left, 0), atol=1e-6)
    assert torch.allclose(out[:, 0, 3], torch.log_softmax(right, 0), atol=1e-6)


@pytest.mark.parametrize("size", [1, 5, 8, 40, 384])
def test_top_eigenpair_against_float64_numpy(size):
    from primaps.masks import top_eigenpair

    gen = np.random.default_rng(size)
    for rank in sorted({1, min(3, size), size}):
        x = gen.standard_normal((rank, size)) * np.linspace(3.0, 1.0, size)
        matrix = (x.T @ x).astype(np.float32)
        value, vector = top_eigenpair(matrix)
        values, vectors = np.linalg.eigh(matrix.astype(np.float64))
        assert value == pytest.approx(values[-1], rel=1e-5)
        assert abs(float(vector.astype(np.float64) @ vectors[:, -1])) == pytest.approx(1.0, abs=1e-5)
    value, vector = top_eigenpair(np.zeros((size, size), np.float32))  # ARPACK refuses a zero matrix
    assert value == 0.0 and vector.shape == (size,)
