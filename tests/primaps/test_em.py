"""The EM's pieces against formulas and hand-made examples, and a small EM on synthetic features that must beat
its PCA initialisation."""

import math

import numpy as np
import torch
import torch.nn.functional as F

from primaps.config import PrimapsConfig
from primaps.losses import (
    IGNORE,
    ema_decay,
    ema_update_,
    focal_class_weights,
    focal_cross_entropy,
    hard_cosine_kmeans_loss,
    majority_vote,
)
from primaps.model import CosinePrototypes
from primaps.steps import build_modules, build_optimizers, em_step, maybe_ema_, pca_init_, start_em_, warmup_step
from shared.metrics import ConfusionAccumulator


def test_focal_weights_and_loss_against_the_formula():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    targets = torch.randint(3, (2, 4, 5), generator=gen)
    targets[0, 0, :] = IGNORE
    probs = logits.softmax(1)
    weights = torch.tensor([(1 - probs[:, c].mean()) ** 2 for c in range(3)], dtype=torch.float64)
    assert torch.allclose(focal_class_weights(logits, 2.0), weights)
    logp = logits.log_softmax(1)
    total = 0.0
    for b in range(2):
        for i in range(4):
            for j in range(5):
                t = int(targets[b, i, j])
                if t != IGNORE:
                    total += -float(weights[t] * logp[b, t, i, j])
    assert math.isclose(float(focal_cross_entropy(logits, targets, 2.0)), total / 40, rel_tol=1e-9)


def test_majority_vote_by_hand():
    pred = torch.tensor([[[0, 0, 1, 2],
                          [1, 1, 1, 2],
                          [2, 2, 0, 0]]])
    masks = torch.tensor([[[1, 1, 1, 0],
                           [2, 2, 2, 0],
                           [3, 3, 3, 3]]])
    # mask 1: {0, 0, 1} -> 0; mask 2: {1, 1, 1} -> 1; mask 3: {2, 2, 0, 0} tie -> smallest class 0; 0 -> ignore
    expected = torch.tensor([[[0, 0, 0, IGNORE],
                              [1, 1, 1, IGNORE],
                              [0, 0, 0, 0]]])
    assert torch.equal(majority_vote(pred, masks, 3), expected)
    # the same per image in a batch of two (masks ids are per image)
    two = majority_vote(torch.cat([pred, 2 - pred]), torch.cat([masks, masks]), 3)
    assert torch.equal(two[1], torch.tensor([[2, 2, 2, IGNORE], [1, 1, 1, IGNORE], [0, 0, 0, 0]]))


def test_hard_kmeans_loss_by_hand():
    sims = torch.tensor([[[[0.2], [0.5]], [[0.9], [-0.1]]]])  # pixel 0: (0.2, 0.9), pixel 1: (0.5, -0.1)
    assert math.isclose(float(hard_cosine_kmeans_loss(sims)), -(0.9 + 0.5) / 2, rel_tol=1e-6)


def test_ema_schedule_and_arithmetic():
    assert [ema_decay(u) for u in (1, 2, 3, 4, 11)] == [0.0, 0.0, 0.5, 1 - 1 / 3, 0.9]
    assert ema_decay(51) == 0.98 and ema_decay(500) == 0.98 and ema_decay(1, warmup=False) == 0.98
    target, source = CosinePrototypes(3, 2), CosinePrototypes(3, 2)
    t0, s0 = target.weight.detach().clone(), source.weight.detach().clone()
    ema_update_(target, source, 0.98)
    assert torch.allclose(target.weight, 0.98 * t0 + 0.02 * s0)
    cfg = PrimapsConfig(ema_every=10)
    modules = build_modules(3, 2)
    assert maybe_ema_(modules, 9, cfg) is None and maybe_ema_(modules, 10, cfg) == 0.0
    assert torch.equal(modules["theta_m"].weight, modules["theta_r"].weight)  # update 1 copies


def test_every_trainable_parameter_gets_a_gradient():
    cfg = PrimapsConfig(label_stride=2)
    modules = build_modules(6, 3)
    code = torch.randn(2, 6, 4, 4)
    labels = torch.randint(3, (2, 8, 8))
    masks = torch.randint(0, 3, (2, 8, 8))
    seen = set()
    for loss, _ in (warmup_step(modules, code, labels, cfg), em_step(modules, code, code, masks, labels, cfg)):
        modules.zero_grad()
        loss.backward()
        seen |= {n for n, p in modules.named_parameters() if p.grad is not None and torch.isfinite(p.grad).all()
                 and p.grad.abs().sum() > 0}
    assert seen == {n for n, _ in modules.named_parameters()}


def synthetic(n=24, k=4, dim=12, grid=8, seed=0):
    """Blocky class maps; a patch's feature is its class prototype + a shared offset + noise; masks = the blocks."""
    gen = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(k, dim, generator=gen), dim=1)
    coarse = torch.randint(k, (n, 2, 2), generator=gen)
    labels = coarse.repeat_interleave(grid // 2, 1).repeat_interleave(grid // 2, 2)
    offset = 1.5 * F.normalize(torch.randn(dim, generator=gen), dim=0)
    feats = (protos[labels] + offset).permute(0, 3, 1, 2) + 0.6 * torch.randn(n, dim, grid, grid, generator=gen)
    blocks = torch.arange(4).view(2, 2).repeat_interleave(grid // 2, 0).repeat_interleave(grid // 2, 1) + 1
    return feats, labels, blocks.expand(n, grid, grid).clone()


def miou(modules, feats, labels, k):
    acc = ConfusionAccumulator(k, k)
    with torch.no_grad():
        acc.update(modules["theta_m"](feats).argmax(1), labels)
    return acc.compute()["miou"]


def test_em_improves_over_its_pca_initialisation():
    k = 4
    feats, labels, masks = synthetic(k=k)
    cfg = PrimapsConfig(ema_every=1)  # the paper's Adam 5e-3
    torch.manual_seed(0)
    modules = build_modules(feats.shape[1], k)
    optimizers = build_optimizers(cfg, modules)
    pca_init_(modules, feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]))
    before = miou(modules, feats, labels, k)
    start_em_(modules)
    rng = np.random.default_rng(0)
    for step in range(100):
        idx = torch.from_numpy(rng.choice(len(feats), 8, replace=False))
        loss, _ = em_step(modules, feats[idx], feats[idx], masks[idx], None, cfg)
        for opt in optimizers.values():
            opt.zero_grad()
        loss.backward()
        optimizers["theta_r"].step()
        maybe_ema_(modules, step + 1, cfg)
    after = miou(modules, feats, labels, k)
    assert after > before + 5, (before, after)  # measured: 29.3 -> 38.8
