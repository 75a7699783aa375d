"""STEGO's training step on fake cached features: partners, gradients, the index stream, micro-batches, learning."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from stego_synthetic import knn_of, make_synthetic

from shared.metrics import segmentation_scores
from stego.config import StegoConfig
from stego.rank_streams import RankStreams
from stego.steps import (
    IndexStream,
    accumulate_gradients,
    apply_gradients,
    build_modules,
    build_optimizers,
    eval_head,
    knn_partners,
    step_losses,
    step_optimizers,
)


def test_knn_partner_is_never_the_image_itself():
    rng = np.random.default_rng(0)
    knn = np.stack([rng.permutation(20)[:10] for _ in range(20)])
    knn[:, 0] = np.arange(20)
    knn[3] = [7, 3, 1, 2, 4, 5, 6, 8, 9, 10]  # ties can move the image away from column 0
    drawn = {i: set() for i in range(20)}
    for _ in range(200):
        indices = rng.integers(0, 20, size=8)
        partners = knn_partners(knn, indices, 7, rng)
        assert not (partners == indices).any()
        for i, p in zip(indices, partners, strict=True):
            drawn[i].add(int(p))
    assert drawn[3] <= {7, 1, 2, 4, 5, 6, 8}
    assert all(len(v) == 7 for v in drawn.values() if v)  # uniform over the top 7: all of them show up


def test_knn_row_with_only_the_image_is_an_error():
    with pytest.raises(ValueError, match="kNN row 0"):
        knn_partners(np.zeros((1, 3), dtype=np.int64), np.array([0]), 7, np.random.default_rng(0))


def test_index_stream_is_a_function_of_the_step_and_splits_ranks():
    stream = IndexStream(40, 8, seed=3)
    first_epoch = np.concatenate([stream.batch(s) for s in range(5)])
    assert sorted(first_epoch.tolist()) == list(range(40))
    assert not np.array_equal(stream.batch(5), stream.batch(0))  # a new shuffle per epoch
    fresh = IndexStream(40, 8, seed=3)
    assert np.array_equal(fresh.batch(7), stream.batch(7))  # what a resumed run sees
    ranks = [IndexStream(40, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    share = [np.concatenate([s.batch(i) for i in range(5)]) for s in ranks]
    assert not set(share[0]) & set(share[1])
    with pytest.raises(ValueError, match="at least 2 per process"):
        IndexStream(1, 8)


def _batch(data, knn, indices, rng):
    partners = knn_partners(knn, indices, 7, rng)
    feats = torch.from_numpy(data.features[indices].astype(np.float32))
    feats_knn = torch.from_numpy(data.features[partners].astype(np.float32))
    return feats, feats_knn, torch.from_numpy(data.labels[indices].astype(np.int64))


def test_every_trainable_parameter_receives_a_gradient():
    torch.manual_seed(0)
    data = make_synthetic(n_images=8)
    knn = knn_of(data)
    cfg = StegoConfig(code_dim=6, feature_samples=4, neg_samples=2)
    modules = build_modules(cfg, data.features.shape[1], 4)
    feats, feats_knn, labels = _batch(data, knn, np.arange(4), np.random.default_rng(0))
    total, logs = step_losses(modules.train(), modules["head"], feats, feats_knn, labels, cfg)
    total.backward()
    for name, param in modules.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert torch.isfinite(param.grad).all(), name
    assert float(logs["loss/total"]) == pytest.approx(
        float(logs["loss/correspondence"] + logs["loss/linear"] + logs["loss/cluster"]), rel=1e-5)


def test_linear_label_stride_scores_every_sth_pixel():
    torch.manual_seed(0)
    data = make_synthetic(n_images=4, label_scale=4)
    cfg = StegoConfig(code_dim=6, feature_samples=3, neg_samples=1, linear_label_stride=2)
    modules = build_modules(cfg, data.features.shape[1], 4).eval()  # eval: no dropout, so the code is repeatable
    feats = torch.from_numpy(data.features.astype(np.float32))
    labels = torch.from_numpy(data.labels.astype(np.int64))
    _, logs = step_losses(modules, modules["head"], feats, feats.flip(0), labels, cfg)
    probe = modules["linear_probe"]
    with torch.no_grad():
        expected = probe.loss(probe(modules["head"](feats)[1]), labels[:, ::2, ::2])
    assert float(logs["loss/linear"]) == pytest.approx(float(expected), rel=1e-6)


def test_micro_batch_steps_equal_averaged_half_steps():
    """micro_batches=2 on one process: each step is the mean of the gradients of two batches, each drawn as a rank
    of a two-rank job would (its own index shard, kNN draw and torch stream seeded seed + rank)."""
    data = make_synthetic(n_images=8)
    knn = knn_of(data)
    cfg = StegoConfig(code_dim=6, feature_samples=4, neg_samples=2, batch_size=2, micro_batches=2, seed=5)
    torch.manual_seed(0)
    modules = build_modules(cfg, data.features.shape[1], 4).train()
    reference, initial = copy.deepcopy(modules), copy.deepcopy(modules)
    optimizers, reference_optimizers = build_optimizers(cfg, modules), build_optimizers(cfg, reference)
    shards = [IndexStream(len(data), 2, rank=r, world_size=2, seed=cfg.seed) for r in range(2)]

    def micro_batch(rank, step):
        return _batch(data, knn, shards[rank].batch(step), np.random.default_rng([cfg.seed, rank, step]))

    streams = RankStreams(cfg.seed, 0, 2, torch.device("cpu"))
    states = []
    for rank in range(2):  # what each rank of a two-rank job starts from
        torch.manual_seed(cfg.seed + rank)
        states.append(torch.get_rng_state())
    params = list(reference.parameters())
    for step in range(2):
        logs = accumulate_gradients(modules, modules["head"], optimizers, lambda m, step=step: micro_batch(m, step),
                                    cfg, streams)
        step_optimizers(modules, optimizers)
        grads, losses = [], []
        for rank in range(2):
            torch.set_rng_state(states[rank])
            total, _ = step_losses(reference, reference["head"], *micro_batch(rank, step), cfg)
            grads.append(torch.autograd.grad(total, params))
            states[rank] = torch.get_rng_state()
            losses.append(float(total.detach()))
        for param, g0, g1 in zip(params, *grads, strict=True):
            param.grad = (g0 + g1) / 2
        for optimizer in reference_optimizers.values():
            optimizer.step()
        assert float(logs["loss/total"]) == pytest.approx(sum(losses) / 2, rel=1e-6)  # logged: the mean
        for (name, ours), theirs in zip(modules.named_parameters(), params, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, msg=name)
    moved = [not torch.equal(a, b) for a, b in zip(modules.parameters(), initial.parameters(), strict=True)]
    assert all(moved)  # every part took its steps


def test_one_micro_batch_is_the_plain_step():
    """micro_batches=1 (the default) computes exactly what backward + apply_gradients computes."""
    data = make_synthetic(n_images=8)
    knn = knn_of(data)
    cfg = StegoConfig(code_dim=6, feature_samples=4, neg_samples=2, batch_size=4)
    torch.manual_seed(0)
    modules = build_modules(cfg, data.features.shape[1], 4).train()
    reference = copy.deepcopy(modules)
    optimizers, reference_optimizers = build_optimizers(cfg, modules), build_optimizers(cfg, reference)
    batch = _batch(data, knn, np.arange(4), np.random.default_rng(0))
    streams = RankStreams(3, 0, 1, torch.device("cpu"))
    logs = accumulate_gradients(modules, modules["head"], optimizers, lambda m: batch, cfg, streams)
    step_optimizers(modules, optimizers)
    torch.manual_seed(3)
    total, expected = step_losses(reference, reference["head"], *batch, cfg)
    apply_gradients(total, reference, reference_optimizers)
    assert {k: float(v) for k, v in logs.items()} == {k: float(v) for k, v in expected.items()}
    for (name, ours), theirs in zip(modules.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(ours, theirs), name


def _train_and_score(data, knn, steps, train_head):
    torch.manual_seed(0)
    # Higher learning rates than the paper's so a few hundred tiny steps suffice.
    cfg = StegoConfig(code_dim=8, batch_size=8, feature_samples=6, neg_samples=3, lr_head=5e-3, lr_cluster=5e-2)
    modules = build_modules(cfg, data.features.shape[1], 4)
    optimizers = build_optimizers(cfg, modules)
    if not train_head:
        optimizers["head"].param_groups[0]["lr"] = 0.0  # same probes and steps, frozen random head
    stream, rng = IndexStream(len(data), cfg.batch_size, seed=0), np.random.default_rng(0)
    for step in range(steps):
        feats, feats_knn, labels = _batch(data, knn, stream.batch(step), rng)
        total, _ = step_losses(modules.train(), modules["head"], feats, feats_knn, labels, cfg)
        apply_gradients(total, modules, optimizers)
    with torch.no_grad():
        out = eval_head(modules, 2.0).eval()(torch.from_numpy(data.features.astype(np.float32)))
    pred = F.interpolate(out["cluster_logits"], size=data.labels.shape[-2:], mode="bilinear").argmax(1)
    return segmentation_scores(pred, torch.from_numpy(data.labels.astype(np.int64)), 4)["miou"]


def test_tiny_stego_run_learns_the_planted_classes():
    data = make_synthetic(noise=0.4, seed=0)
    knn = knn_of(data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny ops run fastest on one thread
    try:
        untrained = _train_and_score(data, knn, 200, train_head=False)
        trained = _train_and_score(data, knn, 200, train_head=True)
    finally:
        torch.set_num_threads(threads)
    # Seeds 0-3 of this setting give 85-92 trained against 27-34 untrained.
    assert trained > 70
    assert trained > untrained + 30


def test_validation_scores_the_head_without_dropout():
    from stego.train import RunData, validate

    data, flipped = make_synthetic(n_images=6, seed=1), make_synthetic(n_images=6, seed=1, flip=True)
    run_data = RunData(train_ds=None, val_ds=None, train=None, val=data, val_flip=flipped, knn=None)
    cfg = StegoConfig(code_dim=6, dropout=0.9)  # heavy dropout: a thinned head would score very differently
    torch.manual_seed(0)
    modules = build_modules(cfg, data.features.shape[1], 4)
    with torch.no_grad():
        expected = validate(modules.eval(), run_data, cfg, 4)["histograms"]["unsupervised"]
    scores = validate(modules.train(), run_data, cfg, 4)  # the state the training loop leaves it in
    assert not modules.training
    np.testing.assert_array_equal(scores["histograms"]["unsupervised"], expected)
