"""EAGLE's loss terms against hand-built float64 references on tiny tensors."""

import math

import numpy as np
import pytest
import torch

from eagle.losses import (
    CorrespondenceSettings,
    correspondence_loss,
    medoid_prototypes,
    near_derangement,
    object_centric_loss,
    pair_loss,
    schedule,
    smoothed_cross_entropy,
    token_weights,
)


def test_prototype_is_the_medoid_of_its_segment():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    segments = torch.tensor([7, 2, 2, 9] * 7 + [9, 7])
    prototypes, targets = medoid_prototypes(tokens, segments)
    ids = sorted(set(segments.tolist()))
    assert prototypes.shape == (3, 4) and [ids[t] for t in targets.tolist()] == segments.tolist()
    for s, seg in enumerate(ids):
        members = [i for i in range(30) if segments[i] == seg]
        costs = [sum(float(torch.dist(tokens[i], tokens[j])) for j in members) for i in members]
        assert torch.equal(prototypes[s], tokens[members[int(np.argmin(costs))]])


def test_prototype_carries_the_gradient_of_its_member():
    tokens = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]], requires_grad=True)  # medoid of all: token 1
    prototypes, _ = medoid_prototypes(tokens, torch.zeros(3, dtype=torch.long))
    prototypes.sum().backward()
    torch.testing.assert_close(tokens.grad, torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))


def _ce(logits: list[float], target: int, smoothing: float) -> float:
    log_z = math.log(sum(math.exp(v) for v in logits))
    off = smoothing / (len(logits) - 1) if smoothing else 0.0
    return -sum(((1 - smoothing) if c == target else off) * (v - log_z) for c, v in enumerate(logits))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_smoothed_cross_entropy_matches_the_formula(smoothing):
    logits = torch.tensor([[1.0, -0.5, 2.0], [0.3, 0.1, -1.0]], dtype=torch.float64)
    targets = torch.tensor([2, 1])
    ours = smoothed_cross_entropy(logits, targets, smoothing)
    ref = [_ce(row, t, smoothing) for row, t in zip(logits.tolist(), targets.tolist(), strict=True)]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-12)


def test_token_weights_are_row_means_of_the_column_normalised_correlation():
    signal = torch.randn(2, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = token_weights(signal)
    ref = []
    for b in range(2):
        f = signal[b].reshape(3, 4).numpy()
        corr = f.T @ f
        corr = corr / np.linalg.norm(corr, axis=0, keepdims=True)
        ref.extend(corr.mean(axis=1))
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_object_centric_loss_matches_a_hand_built_reference(smoothing):
    gen = torch.Generator().manual_seed(2)
    z = torch.nn.functional.normalize(torch.randn(6, 3, generator=gen, dtype=torch.float64), dim=1)
    z_other = torch.nn.functional.normalize(torch.randn(6, 3, generator=gen, dtype=torch.float64), dim=1)
    segments = torch.tensor([4, 4, 1, 1, 1, 4])
    weights = torch.rand(6, generator=gen, dtype=torch.float64)
    ours, terms = object_centric_loss(z, z_other, segments, weights, temperature=0.07, global_weight=0.7,
                                      smoothing=smoothing)
    # Medoids by hand: segment 1 = tokens {2, 3, 4}, segment 4 = {0, 1, 5}; targets in increasing id order.
    protos = []
    for members in ([2, 3, 4], [0, 1, 5]):
        costs = [sum(float(torch.dist(z[i], z[j])) for j in members) for i in members]
        protos.append(z[members[int(np.argmin(costs))]])
    targets = [1, 1, 0, 0, 0, 1]

    def term(rows):
        return sum(float(weights[t]) * _ce([float(rows[t] @ p) / 0.07 for p in protos], targets[t], smoothing)
                   for t in range(6)) / 6

    local, glob = term(z), term(z_other)
    assert float(terms["local"]) == pytest.approx(local, rel=1e-10)
    assert float(terms["global"]) == pytest.approx(glob, rel=1e-10)
    assert float(ours) == pytest.approx((0.3 * local + 0.7 * glob) / 2, rel=1e-10)


SETTINGS = CorrespondenceSettings(lambda_pos=0.25, lambda_neg=0.63, shift_bias=0.11, shift_value=3.5,
                                  feature_samples=2, neg_samples=5)


def _pair_reference(f1, f2, c1, c2, positive: bool, settings=SETTINGS) -> float:
    """Loops over the (B, S, S, S, S) correlation in float64."""
    def unit(t):
        return t / np.linalg.norm(t, axis=1, keepdims=True)

    f1, f2, c1, c2 = (unit(t.numpy()) for t in (f1, f2, c1, c2))
    fd = np.einsum("nchw,ncij->nhwij", f1, f2)
    old = fd.mean()
    fd = fd - fd.mean(axis=(3, 4), keepdims=True)
    fd = fd - fd.mean() + old
    cd = np.einsum("nchw,ncij->nhwij", c1, c2)
    if positive:
        shift = abs(fd.mean() - cd.mean() - settings.shift_bias)
    else:
        shift = (fd.mean() + cd.mean() - settings.shift_bias) * settings.shift_value
    return float(np.mean(-np.clip(cd, 0.0, 0.8) * (fd - shift)))


@pytest.mark.parametrize("positive", [True, False])
def test_pair_loss_matches_the_formula(positive):
    gen = torch.Generator().manual_seed(3)
    f1, f2 = torch.randn(2, 4, 2, 2, generator=gen, dtype=torch.float64), torch.randn(2, 4, 2, 2, generator=gen,
                                                                                      dtype=torch.float64)
    c1, c2 = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64), torch.randn(2, 3, 2, 2, generator=gen,
                                                                                      dtype=torch.float64)
    ours = pair_loss(f1, f2, c1, c2, SETTINGS, positive=positive)
    assert float(ours) == pytest.approx(_pair_reference(f1, f2, c1, c2, positive), rel=1e-10)


def test_correspondence_loss_combines_the_terms_with_their_weights():
    gen = torch.Generator().manual_seed(4)
    signal, signal_aug = (torch.randn(3, 4, 3, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    code, code_aug = (torch.randn(3, 5, 3, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    total, terms = correspondence_loss(signal, signal_aug, code, code_aug, SETTINGS,
                                       generator=torch.Generator().manual_seed(9))
    assert float(total) == pytest.approx(0.25 * float(terms["pos"]) + 0.63 * float(terms["neg"]), rel=1e-12)
    # Same input as x_aug and x everywhere except the grids: replay the draws to rebuild the positive term.
    replay = torch.Generator().manual_seed(9)
    grids = [torch.rand((3, 2, 2, 2), generator=replay, dtype=torch.float64) * 2 - 1 for _ in range(3)]

    def sample(t, g):
        return torch.nn.functional.grid_sample(t, g, mode="bilinear", padding_mode="border", align_corners=True)

    pos = _pair_reference(sample(signal_aug, grids[2]), sample(signal, grids[1]), sample(code_aug, grids[2]),
                          sample(code, grids[1]), positive=True)
    assert float(terms["pos"]) == pytest.approx(pos, rel=1e-10)
    f1, c1 = sample(signal, grids[0]), sample(code, grids[0])
    f2, c2 = sample(signal, grids[1]), sample(code, grids[1])
    perms = [near_derangement(3, replay) for _ in range(5)]
    neg = np.mean([_pair_reference(f1, f2[p], c1, c2[p], positive=False) for p in perms])
    assert float(terms["neg"]) == pytest.approx(neg, rel=1e-10)


def test_near_derangement_pairs_no_image_with_itself():
    for seed in range(50):
        perm = near_derangement(4, torch.Generator().manual_seed(seed))
        assert not (perm == torch.arange(4)).any() and ((perm >= 0) & (perm < 4)).all()
    with pytest.raises(ValueError, match="batch_size"):
        near_derangement(1)


def test_schedule_switches_after_the_configured_step():
    assert [schedule(s, 200, 0.9) for s in (0, 200, 201, 5000)] == [0.0, 0.0, 0.9, 0.9]
