"""SegUnify's objectives against brute-force float64 references, and the k-means start of the centres."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from segunify.centres import kmeans_directions
from segunify.losses import (
    PartnerTerm,
    centred_feature_similarity,
    correspondence_loss,
    cyclic_derangement,
    labeler_loss,
    partner_loss,
    read_at,
    unit,
)


def _brute_partner_loss(f1, f2, c1, c2, shift):
    """L(x, y; b) with explicit loops over every position pair, in float64."""
    f1, f2, c1, c2 = (t.double() for t in (f1, f2, c1, c2))
    b, _, s, _ = f1.shape
    feat = torch.zeros(b, s, s, s, s, dtype=torch.float64)
    code = torch.zeros_like(feat)
    for n, i, j, k, m in itertools.product(range(b), range(s), range(s), range(s), range(s)):
        feat[n, i, j, k, m] = (f1[n, :, i, j] * f2[n, :, k, m]).sum()
        code[n, i, j, k, m] = max(0.0, float((c1[n, :, i, j] * c2[n, :, k, m]).sum()))
    overall = feat.mean()
    centred = feat.clone()
    for n, i, j in itertools.product(range(b), range(s), range(s)):
        centred[n, i, j] -= feat[n, i, j].mean()
    centred = centred - centred.mean() + overall
    return -(code * (centred - shift)).mean()


def test_partner_loss_matches_brute_force():
    torch.manual_seed(0)
    f1, f2 = unit(torch.randn(2, 5, 3, 3)), unit(torch.randn(2, 5, 3, 3))
    c1, c2 = unit(torch.randn(2, 4, 3, 3)), unit(torch.randn(2, 4, 3, 3))
    ours = partner_loss(f1, f2, c1, c2, shift=0.2)
    assert float(ours) == pytest.approx(float(_brute_partner_loss(f1, f2, c1, c2, 0.2)), rel=1e-5)


def test_centring_removes_each_positions_mean_but_keeps_the_overall_mean():
    torch.manual_seed(1)
    f1, f2 = unit(torch.randn(3, 6, 4, 4)), unit(torch.randn(3, 6, 4, 4))
    raw = torch.einsum("bcij,bckl->bijkl", f1, f2)
    centred = centred_feature_similarity(f1, f2)
    spread = centred.mean(dim=(3, 4))  # per position of the first image: all equal to the overall mean
    torch.testing.assert_close(spread, torch.full_like(spread, float(raw.mean())), rtol=1e-5, atol=1e-6)
    assert not centred.requires_grad


def test_correspondence_loss_is_the_weighted_sum_of_its_terms_and_reaches_both_codes():
    torch.manual_seed(2)
    feats, feats_knn = torch.randn(4, 6, 5, 5), torch.randn(4, 6, 5, 5)
    code = torch.randn(4, 3, 5, 5, requires_grad=True)
    code_knn = torch.randn(4, 3, 5, 5, requires_grad=True)
    terms = {"self": PartnerTerm(0.5, 0.1), "knn": PartnerTerm(0.3, 0.2), "random": PartnerTerm(0.7, 0.4)}
    total, parts = correspondence_loss(feats, feats_knn, code, code_knn, terms, n_samples=4, n_random=2,
                                       generator=torch.Generator().manual_seed(0))
    expected = 0.5 * parts["self"] + 0.3 * parts["knn"] + 0.7 * parts["random"]
    assert float(total.detach()) == pytest.approx(float(expected), rel=1e-6)
    # The self term by hand: same grid drawn first from the same generator.
    generator = torch.Generator().manual_seed(0)
    grid = torch.rand((4, 4, 4, 2), generator=generator) * 2 - 1
    f, c = unit(read_at(feats, grid)), unit(read_at(code.detach(), grid))
    assert float(parts["self"]) == pytest.approx(float(partner_loss(f, f, c, c, 0.1)), rel=1e-6)
    total.backward()
    assert code.grad.abs().sum() > 0 and code_knn.grad.abs().sum() > 0


def test_cyclic_derangement_is_a_permutation_without_fixed_points():
    generator = torch.Generator().manual_seed(0)
    for n in (2, 3, 7, 16):
        for _ in range(20):
            perm = cyclic_derangement(n, generator, "cpu")
            assert sorted(perm.tolist()) == list(range(n))
            assert not bool((perm == torch.arange(n)).any())
    with pytest.raises(ValueError, match="at least 2 images"):
        cyclic_derangement(1, generator, "cpu")


def test_labeler_loss_is_cross_entropy_on_the_global_argmax_plus_energy():
    torch.manual_seed(3)
    local = torch.rand(2, 2, 3, 2, 2) * 2 - 1  # (sets, B, K, h, w) cosines
    global_scores = torch.rand(2, 3, 2, 2) * 2 - 1
    total, parts = labeler_loss(local, global_scores, temperature=0.5, energy_weight=4.0)
    target = global_scores.argmax(1)  # (B, h, w)
    ce, energy = [], []
    for scores in local.double():
        logp = torch.log_softmax(scores / 0.5, dim=1)
        ce.append(-logp.gather(1, target[:, None]).mean())
        energy.append(-scores.max(dim=1).values.mean())
    expected_ce, expected_energy = torch.stack(ce).mean(), torch.stack(energy).mean()
    assert float(parts["agreement"]) == pytest.approx(float(expected_ce), rel=1e-6)
    assert float(parts["energy"]) == pytest.approx(float(expected_energy), rel=1e-6)
    assert float(total) == pytest.approx(float(expected_ce + 4.0 * expected_energy), rel=1e-6)


def test_kmeans_directions_find_planted_directions():
    torch.manual_seed(4)
    truth = F.normalize(torch.randn(4, 10), dim=1)
    tokens = truth.repeat_interleave(50, 0) + 0.05 * torch.randn(200, 10)
    found = kmeans_directions(tokens, 4, iters=10, generator=torch.Generator().manual_seed(0))
    best = (found @ truth.T).max(dim=0).values  # every planted direction has a centre within ~3 degrees
    assert bool((best > 0.998).all())
    with pytest.raises(ValueError, match="only 3 tokens"):
        kmeans_directions(tokens[:3], 4, iters=1, generator=torch.Generator())
