"""Cosine k-means baseline: recovers planted classes, restarts are seeded, init methods behave."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from baselines.kmeans.kmeans import assign, cosine_kmeans, init_centres
from shared.metrics import segmentation_scores


def blocky_class_features(n_images=12, n_classes=4, dim=16, grid=8, block=2, noise=0.2, seed=0):
    """Features (N, C, h, w) = class prototype + noise on blocky class maps; labels (N, h, w)."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(n_classes, dim, generator=gen), dim=1)
    coarse = torch.randint(n_classes, (n_images, grid // block, grid // block), generator=gen)
    labels = coarse.repeat_interleave(block, 1).repeat_interleave(block, 2)  # (N, h, w)
    feats = prototypes[labels].permute(0, 3, 1, 2) + noise * torch.randn(n_images, dim, grid, grid, generator=gen)
    return feats, labels


def test_kmeans_recovers_planted_classes():
    feats, labels = blocky_class_features()
    vectors = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    result = cosine_kmeans(vectors, 4, n_init=3, seed=0)
    scores = segmentation_scores(result.labels.reshape(labels.shape), labels, n_classes=4)
    assert scores["miou"] > 90
    assert torch.allclose(result.centres.norm(dim=1), torch.ones(4), atol=1e-5)


def test_inertia_is_the_cosine_distance_to_the_assigned_centre():
    feats, _ = blocky_class_features(seed=1)
    x = F.normalize(feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]), dim=1)
    result = cosine_kmeans(x, 4, n_init=2, seed=3)
    brute = (1 - (x[:, None, :] * result.centres[None]).sum(-1)).min(dim=1)
    assert result.inertia == pytest.approx(float(brute.values.sum()), rel=1e-5)
    assert torch.equal(result.labels, brute.indices)


def test_best_restart_is_kept_and_seeding_is_reproducible():
    feats, _ = blocky_class_features(noise=0.9, seed=2)
    x = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    single = [cosine_kmeans(x, 6, n_init=1, seed=s, init="random").inertia for s in range(4)]
    best = cosine_kmeans(x, 6, n_init=4, seed=0, init="random")
    assert best.inertia == pytest.approx(min(single), rel=1e-6)
    again = cosine_kmeans(x, 6, n_init=4, seed=0, init="random")
    assert torch.equal(best.labels, again.labels)


def test_kmeanspp_picks_distinct_points_and_assign_is_nearest():
    x = F.normalize(torch.eye(5) + 0.01, dim=1)
    centres = init_centres(x, 5, "k-means++", torch.Generator().manual_seed(0))
    assert len({tuple(np.round(c.numpy(), 6)) for c in centres}) == 5
    labels, best = assign(x, centres)
    assert torch.allclose(best, torch.ones(5), atol=1e-6)
    with pytest.raises(ValueError, match="unknown k-means init"):
        init_centres(x, 2, "bogus", torch.Generator())
    with pytest.raises(ValueError, match="at least k=7"):
        cosine_kmeans(x, 7)
