"""SegUnify's training step on planted synthetic features: gradients, the schedule, the batch stream, the stability
of the global identities, and the planted-class benchmark against the k-means baseline."""

import numpy as np
import pytest
import torch
from planted_benchmark import kmeans_miou, miou_of_logits, stego_synthetic

from segunify.config import SegUnifyConfig
from segunify.losses import labeler_loss
from segunify.model import Labeler
from segunify.steps import (
    BatchStream,
    apply_gradients,
    build_modules,
    build_optimizers,
    draw_knn_partners,
    eval_head,
    schedule_factor,
    start_centres,
    step_generator,
    step_losses,
)

# Higher learning rates than the defaults so that a few hundred tiny steps suffice (as in STEGO's test).
FAST = dict(code_dim=8, batch_size=8, feature_samples=6, random_partners=3, lr_compressor=5e-3, lr_labeler=5e-2)


def _batch(data, knn, indices, rng):
    partners = draw_knn_partners(knn, indices, 7, rng)
    feats = torch.from_numpy(data.features[indices].astype(np.float32))
    return feats, torch.from_numpy(data.features[partners].astype(np.float32)), \
        torch.from_numpy(data.labels[indices].astype(np.int64))


def test_every_trainable_parameter_receives_a_gradient():
    syn = stego_synthetic()
    data = syn.make_synthetic(n_images=8)
    torch.manual_seed(0)
    cfg = SegUnifyConfig(**FAST, n_local_sets=2)
    modules = build_modules(cfg, data.features.shape[1], 4)
    feats, feats_knn, labels = _batch(data, syn.knn_of(data), np.arange(4), np.random.default_rng(0))
    total, logs = step_losses(modules.train(), modules["compressor"], feats, feats_knn, labels, cfg,
                              step_generator(0, 0, 0, "cpu"))
    total.backward()
    for name, param in modules.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    parts = logs["loss/correspondence"] + logs["loss/labeler"] + logs["loss/linear"]
    assert float(logs["loss/total"]) == pytest.approx(float(parts), rel=1e-5)


@pytest.mark.parametrize("joint", [False, True])
def test_the_labeler_reaches_the_compressor_only_when_asked(joint):
    syn = stego_synthetic()
    data = syn.make_synthetic(n_images=8)
    feats, feats_knn, _ = _batch(data, syn.knn_of(data), np.arange(4), np.random.default_rng(0))
    grads = {}
    for energy in (0.0, 5.0):  # a different labeler loss, everything else equal
        torch.manual_seed(0)
        cfg = SegUnifyConfig(**FAST, energy_weight=energy, labeler_trains_compressor=joint)
        modules = build_modules(cfg, data.features.shape[1], 4)
        total, _ = step_losses(modules.train(), modules["compressor"], feats, feats_knn, None, cfg,
                               step_generator(0, 0, 0, "cpu"))
        total.backward()
        grads[energy] = torch.cat([p.grad.flatten() for p in modules["compressor"].parameters()])
    assert torch.equal(grads[0.0], grads[5.0]) != joint


def test_polynomial_schedule_with_restarts():
    cfg = SegUnifyConfig(lr_schedule="poly_restarts", poly_power=0.5, restart_every=10, max_steps=30)
    assert [schedule_factor(cfg, s) for s in (0, 5, 9, 10, 15)] == pytest.approx(
        [1.0, 0.5 ** 0.5, 0.1 ** 0.5, 1.0, 0.5 ** 0.5])
    assert schedule_factor(SegUnifyConfig(lr_schedule="poly_restarts", max_steps=40), 30) == pytest.approx(0.25 ** 0.9)
    assert schedule_factor(SegUnifyConfig(), 123) == 1.0


def test_batch_stream_is_a_function_of_the_step():
    stream = BatchStream(40, 8, seed=3)
    assert sorted(np.concatenate([stream.batch(s) for s in range(5)]).tolist()) == list(range(40))
    assert np.array_equal(BatchStream(40, 8, seed=3).batch(7), stream.batch(7))
    ranks = [BatchStream(40, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    assert not set(np.concatenate([s.batch(i) for s in ranks[:1] for i in range(5)])) & \
        set(np.concatenate([s.batch(i) for s in ranks[1:] for i in range(5)]))
    with pytest.raises(ValueError, match="at least 2 per process"):
        BatchStream(1, 8)
    knn = np.array([[0, 1, 2], [1, 0, 2], [2, 2, 2]])
    assert set(draw_knn_partners(knn, np.array([0, 0, 0, 0, 1]), 7, np.random.default_rng(0))) <= {0, 1, 2}
    with pytest.raises(ValueError, match="image 2 lists only the image itself"):
        draw_knn_partners(knn, np.array([2]), 7, np.random.default_rng(0))


def _train(data, knn, steps, **overrides):
    """SegUnify on planted features (the loop of train.py without the run directory): the exported head's mIoU."""
    torch.manual_seed(0)
    cfg = SegUnifyConfig(**{**FAST, **overrides})
    modules = build_modules(cfg, data.features.shape[1], 4)
    optimizers = build_optimizers(cfg, modules)
    stream, rng = BatchStream(len(data.features), cfg.batch_size, seed=0), np.random.default_rng(0)
    every = torch.from_numpy(data.features.astype(np.float32))
    start_centres(modules, every[stream.batch(0)], cfg)
    for step in range(steps):
        feats, feats_knn, _ = _batch(data, knn, stream.batch(step), rng)
        total, _ = step_losses(modules.train(), modules["compressor"], feats, feats_knn, None, cfg,
                               step_generator(0, 0, step, "cpu"))
        apply_gradients(total, modules, optimizers)
    with torch.no_grad():
        logits = eval_head(modules, cfg.alpha).eval()(every)["cluster_logits"]
    return miou_of_logits(logits, data.labels, 4)


@pytest.fixture(scope="module")
def planted():
    syn = stego_synthetic()
    data = syn.make_synthetic(noise=0.4, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny ops run fastest on one thread
    try:
        yield data, syn.knn_of(data)
    finally:
        torch.set_num_threads(threads)


def test_reaches_the_kmeans_baseline_on_the_planted_benchmark(planted):
    data, knn = planted
    miou = _train(data, knn, 200)
    kmeans = kmeans_miou(data, 4)
    # Measured with these settings: 80-93 over seeds 0-11 against k-means' 68-84 (91.4 vs 83.9 at seed 0).
    assert miou >= kmeans, (miou, kmeans)


def _planted_tokens(truth: torch.Tensor, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes (n,) and codes (1, D, 1, n) = planted direction + noise, the layout the labeler reads."""
    classes = torch.randint(len(truth), (n,), generator=gen)
    code = truth[classes] + 0.3 * torch.randn(n, truth.shape[1], generator=gen)
    return classes, code.T.reshape(1, truth.shape[1], 1, n)


def test_global_identities_hold_while_the_local_centres_move():
    """Default labeler losses on a fixed planted code, small noisy batches and a high learning rate: the local
    centres jitter from step to step, the EMA global centres barely move and keep every token's cluster."""
    torch.manual_seed(0)
    cfg = SegUnifyConfig()
    truth = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    gen = torch.Generator().manual_seed(1)
    _, probe = _planted_tokens(truth, 2000, gen)
    labeler = Labeler(8, 4, ema=cfg.ema)
    labeler.start_at(truth)
    optimizer = torch.optim.Adam(labeler.parameters(), lr=5e-2)
    flips = {"local": 0, "global": 0}
    path = {"local": 0.0, "global": 0.0}
    first = labeler.global_scores(probe).argmax(1)
    previous = {"local": labeler.local_scores(probe)[0].argmax(1), "global": first}
    for _ in range(200):
        centres = {"local": labeler.local.detach()[0].clone(), "global": labeler.global_centres.clone()}
        _, code = _planted_tokens(truth, 32, gen)
        loss, _ = labeler_loss(labeler.local_scores(code), labeler.global_scores(code), temperature=cfg.temperature,
                               energy_weight=cfg.energy_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        labeler.update_global()
        with torch.no_grad():
            now = {"local": labeler.local_scores(probe)[0].argmax(1), "global": labeler.global_scores(probe).argmax(1)}
            moved = {"local": labeler.local.detach()[0], "global": labeler.global_centres}
        for key in flips:
            flips[key] += int((now[key] != previous[key]).sum())
            path[key] += float((moved[key] - centres[key]).norm())
        previous = now
    assert path["global"] < 0.25 * path["local"]  # 0.13 measured
    assert flips["global"] < 0.2 * flips["local"]  # 116 against 1729 measured
    assert float((previous["global"] == first).float().mean()) > 0.98  # no identity switched


def _majority_classes(assignment: torch.Tensor, classes: torch.Tensor) -> list[int]:
    """The planted class most of each cluster's tokens belong to (the cluster's identity)."""
    return [int(torch.bincount(classes[assignment.flatten() == k], minlength=4).argmax()) for k in range(4)]


def test_agreement_pulls_moved_local_centres_back_to_the_global_identities():
    """Two local centres swap identities; the agreement term (alone here) brings them back while every global
    centre keeps its class. With the default energy weight (10) the energy holds the swapped set in its own minimum
    instead, and the global centres would follow it: see segunify/README.md."""
    torch.manual_seed(0)
    truth = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    gen = torch.Generator().manual_seed(1)
    probe_classes, probe = _planted_tokens(truth, 2000, gen)
    labeler = Labeler(8, 4, ema=0.99)
    labeler.start_at(truth)
    with torch.no_grad():
        labeler.local[0, [0, 1]] = labeler.local[0, [1, 0]].clone()
    optimizer = torch.optim.Adam(labeler.parameters(), lr=5e-3)
    before = labeler.global_scores(probe).argmax(1)
    assert float((labeler.local_scores(probe)[0].argmax(1) == before).float().mean()) < 0.6
    for _ in range(300):
        _, code = _planted_tokens(truth, 256, gen)
        loss, _ = labeler_loss(labeler.local_scores(code), labeler.global_scores(code), temperature=0.3,
                               energy_weight=0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        labeler.update_global()
    with torch.no_grad():
        after, local = labeler.global_scores(probe).argmax(1), labeler.local_scores(probe)[0].argmax(1)
    assert _majority_classes(after, probe_classes) == _majority_classes(before, probe_classes) == [0, 1, 2, 3]
    assert float((local == after).float().mean()) > 0.95  # 0.97 measured


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 6))
def test_reaches_the_kmeans_baseline_on_other_planted_seeds(seed):
    syn = stego_synthetic()
    data = syn.make_synthetic(noise=0.4, seed=seed)
    assert _train(data, syn.knn_of(data), 200) >= kmeans_miou(data, 4)
