"""Uncertainty-aware smoothing: confident pixels unchanged, uncertain ones pulled toward similar confident
neighbours, weights against a brute-force loop."""

import torch

from pusegnet.smoothing import smoothing_weights, uncertainty_aware_smoothing


def _scene():
    """A 6x6 image, left half class 0 and right half class 1 (features e0 / e1); pixel (2, 2) on the left is
    uncertain and predicts class 1."""
    features = torch.zeros(1, 4, 6, 6)
    features[0, 0, :, :3] = 1.0
    features[0, 1, :, 3:] = 1.0
    probs = torch.zeros(1, 2, 6, 6)
    probs[0, 0, :, :3], probs[0, 1, :, :3] = 0.9, 0.1
    probs[0, 0, :, 3:], probs[0, 1, :, 3:] = 0.1, 0.9
    probs[0, :, 2, 2] = torch.tensor([0.3, 0.7])
    variance = torch.full((1, 6, 6), 0.01)
    variance[0, 2, 2] = 1.0
    return probs, variance, features


def test_confident_pixels_stay_and_uncertain_ones_follow_similar_neighbours():
    probs, variance, features = _scene()
    out = uncertainty_aware_smoothing(probs, variance, features, iterations=5, percentile=90.0, window=3,
                                      sigma=0.5, eps=1e-3)
    changed = (out - probs).abs().amax(1)[0] > 0
    assert changed.sum() == 1 and changed[2, 2]  # only the uncertain pixel moves
    assert float(out[0, 0, 2, 2]) > 0.85  # toward its similar, confident class-0 neighbours (0.9)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 6, 6))


def test_dissimilar_neighbours_barely_count():
    probs, variance, features = _scene()
    # the uncertain pixel sits at the boundary (column 2) with class-1 neighbours in column 3
    near = uncertainty_aware_smoothing(probs, variance, features, iterations=1, percentile=90.0, sigma=0.5)
    wide = uncertainty_aware_smoothing(probs, variance, features, iterations=1, percentile=90.0, sigma=100.0)
    assert float(near[0, 0, 2, 2]) > float(wide[0, 0, 2, 2]) + 0.1  # feature similarity keeps class 1 out


def test_weights_against_a_loop():
    gen = torch.Generator().manual_seed(0)
    features, variance = torch.randn(1, 3, 4, 5, generator=gen), torch.rand(1, 4, 5, generator=gen)
    weights = smoothing_weights(features, variance, window=3, sigma=0.7, eps=1e-3)  # (1, 9, 4, 5)
    unit = torch.nn.functional.normalize(features, dim=1)
    for i in range(4):
        for j in range(5):
            for k, (dy, dx) in enumerate((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)):
                y, x = i + dy, j + dx
                if not (0 <= y < 4 and 0 <= x < 5):
                    expected = 0.0
                else:
                    d2 = float(((unit[0, :, i, j] - unit[0, :, y, x]) ** 2).sum())
                    expected = torch.exp(torch.tensor(-d2 / 0.49)).item() / (float(variance[0, y, x]) + 1e-3)
                assert abs(float(weights[0, k, i, j]) - expected) < 1e-4 * max(1.0, expected)
