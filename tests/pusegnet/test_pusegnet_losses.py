"""The similarity loss's three properties (README, "Properties of the similarity loss") and the weighted CE."""

import itertools

import torch
import torch.nn.functional as F

from pusegnet.losses import confidence_weighted_ce, feature_similarity, similarity_loss


def test_value_is_within_the_stated_bounds_and_they_are_reached():
    gen = torch.Generator().manual_seed(0)
    for b in (-0.5, 0.0, 0.2, 0.9):
        for scale in (0.1, 3.0, 50.0):  # from nearly uniform to one-hot predictions
            logits = scale * torch.randn(3, 5, 40, generator=gen)
            probs = torch.softmax(logits, dim=1)
            sim = feature_similarity(torch.randn(3, 8, 40, generator=gen), torch.randn(3, 8, 40, generator=gen),
                                     pointwise=False)
            value = float(similarity_loss(sim, probs, probs, b))
            assert b - 1 - 1e-6 <= value <= b + 1 + 1e-6
    # the bounds are tight: F = 1 everywhere with full agreement gives b - 1, F = -1 gives b + 1
    one_hot = F.one_hot(torch.zeros(1, 6, dtype=torch.long), 3).permute(0, 2, 1).float()
    assert abs(float(similarity_loss(torch.ones(1, 6, 6), one_hot, one_hot, 0.2)) - (0.2 - 1)) < 1e-6
    assert abs(float(similarity_loss(-torch.ones(1, 6, 6), one_hot, one_hot, 0.2)) - (0.2 + 1)) < 1e-6


def test_pointwise_centred_similarity_stays_within_minus_three_and_three():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        a = torch.randn(2, 4, 30, generator=gen) + 3 * torch.randn(2, 4, 1, generator=gen)
        sim = feature_similarity(a, a, pointwise=True)
        assert float(sim.abs().max()) <= 3 + 1e-6


def test_gradient_with_respect_to_the_logits_is_bounded():
    """|d L / d z_i| <= max|F - b| (n_i / M) / 2 per pixel, with n_i the pairs of the M that contain pixel i
    (one side each for probs_a and probs_b); here every pixel appears in N pairs on each side."""
    gen = torch.Generator().manual_seed(2)
    n, b = 16, 0.2
    for scale in (0.01, 1.0, 10.0, 1e3):
        logits = (scale * torch.randn(1, 4, n, generator=gen)).requires_grad_()
        sim = 2 * torch.rand(1, n, n, generator=gen) - 1
        probs = torch.softmax(logits, dim=1)
        similarity_loss(sim, probs, probs, b).backward()
        grad_norm = logits.grad.norm(dim=1)  # (1, N)
        bound = float((sim - b).abs().max()) * (2 * n / n**2) / 2
        assert float(grad_norm.max()) <= bound + 1e-7
    # and the bound is not vacuous: for moderate logits the gradient is within a factor 10 of it
    assert float(grad_norm.max()) < bound


def test_block_structured_similarity_is_minimised_by_block_labels():
    """Brute force over all hard assignments of 6 pixels to 3 classes: the unique minimisers (up to renaming the
    classes) give one class per block and different classes to different blocks."""
    blocks = torch.tensor([0, 0, 1, 1, 2, 2])
    sim = torch.where(blocks[:, None] == blocks[None, :], 0.9, -0.3)[None]
    best, winners = float("inf"), []
    for assignment in itertools.product(range(3), repeat=6):
        probs = F.one_hot(torch.tensor(assignment), 3).T[None].float()
        value = float(similarity_loss(sim, probs, probs, 0.2))
        if value < best - 1e-9:
            best, winners = value, [assignment]
        elif abs(value - best) < 1e-9:
            winners.append(assignment)
    assert len(winners) == 6  # the 3! renamings of one labelling
    for w in winners:
        assert w[0] == w[1] and w[2] == w[3] and w[4] == w[5] and len({w[0], w[2], w[4]}) == 3


def test_gradient_descent_on_soft_predictions_reaches_the_block_labels():
    torch.manual_seed(0)
    blocks = torch.arange(4).repeat_interleave(5)  # 4 blocks of 5 pixels, 5 classes available
    sim = torch.where(blocks[:, None] == blocks[None, :], 0.8, -0.2)[None]
    logits = (0.1 * torch.randn(1, 5, 20)).requires_grad_()
    optimizer = torch.optim.Adam([logits], lr=0.1)
    for _ in range(500):
        probs = torch.softmax(logits, dim=1)
        loss = similarity_loss(sim, probs, probs, 0.2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    labels = logits.argmax(1)[0]
    per_block = [set(labels[blocks == k].tolist()) for k in range(4)]
    assert all(len(s) == 1 for s in per_block)
    assert len(set.union(*per_block)) == 4


def test_confidence_weighted_ce_against_a_loop():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 4, 4, generator=gen)
    pseudo = torch.randint(3, (2, 4, 4), generator=gen)
    conf = torch.rand(2, 4, 4, generator=gen)
    num = den = 0.0
    for b, i, j in itertools.product(range(2), range(4), range(4)):
        ce = -float(torch.log_softmax(logits[b, :, i, j].double(), 0)[pseudo[b, i, j]])
        num, den = num + float(conf[b, i, j]) * ce, den + float(conf[b, i, j])
    assert abs(float(confidence_weighted_ce(logits, pseudo, conf)) - num / den) < 1e-5
