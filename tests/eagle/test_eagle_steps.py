"""EAGLE's training step on hand-made tensors: every trainable parameter gets a gradient, the blurred view and its
draws, the eigen probe's loss, a NaN code stopping the step, and the exported head."""

import numpy as np
import pytest
import torch

from eagle.config import EagleConfig
from eagle.model import EigenClusterProbe
from eagle.steps import augmented_features, blur, blur_plan, build_modules, eval_head, step_losses
from shared.run_guard import NonFiniteLossError
from shared.segmenter import load, save

C, CLASSES, GRID, PATCH = 12, 5, 4, 8


def _cfg(**overrides) -> EagleConfig:
    base = dict(code_dim=6, eigen_clusters=5, feature_samples=3, neg_samples=2, schedule_step=-1, n_extra_clusters=1,
                backbone_weights="none")
    return EagleConfig(**(base | overrides))


def _batch(seed: int = 0, batch: int = 3):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, C, GRID, GRID, generator=gen)
    feats_aug = feats + 0.1 * torch.randn(batch, C, GRID, GRID, generator=gen)
    images = torch.randn(batch, 3, GRID * PATCH, GRID * PATCH, generator=gen)
    labels = torch.randint(-1, CLASSES, (batch, GRID * PATCH, GRID * PATCH), generator=gen)
    return feats, feats_aug, images, labels


def test_every_trainable_parameter_receives_a_gradient():
    cfg = _cfg()  # schedule_step -1: u > 0 at step 0, so the object-centric loss reaches the projection
    torch.manual_seed(0)
    modules = build_modules(cfg, C, CLASSES).train()
    feats, feats_aug, images, labels = _batch()
    total, logs = step_losses(modules, modules["head"], feats, feats_aug, images, labels, cfg, step=0)
    total.backward()
    assert float(logs["schedule/u"]) == pytest.approx(0.9)
    for name, param in modules.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_total_loss_follows_the_schedule():
    torch.manual_seed(0)
    for step, u in ((0, 0.0), (5, 0.9)):
        cfg = _cfg(schedule_step=3)
        modules = build_modules(cfg, C, CLASSES).eval()  # no dropout: the terms are deterministic given the grids
        torch.manual_seed(1)
        total, logs = step_losses(modules, modules["head"], *_batch(), cfg, step=step)
        expected = ((logs["loss/eigen"] + logs["loss/eigen_aug"]) / 2 + (1 - u) * logs["loss/correspondence"]
                    + u * 0.85 * (logs["loss/obj"] + logs["loss/obj_aug"]) + logs["loss/linear"] + logs["loss/cluster"])
        torch.testing.assert_close(total.detach(), expected)


def test_nan_in_the_code_stops_the_step_with_a_sentence():
    cfg = _cfg()
    modules = build_modules(cfg, C, CLASSES)
    feats, feats_aug, images, labels = _batch()
    feats[0, :, 1, 1] = float("nan")
    with pytest.raises(NonFiniteLossError, match="Non-finite code at step 4"):
        step_losses(modules, modules["head"], feats, feats_aug, images, labels, cfg, step=4)


def test_eigen_probe_loss_is_soft_cosine_kmeans():
    probe = EigenClusterProbe(3, 4)
    x = torch.randn(2, 3, 2, 2)
    loss, log_probs = probe(x, 1.0)
    xn = x / x.norm(dim=1, keepdim=True)
    cn = probe.centres / probe.centres.norm(dim=1, keepdim=True)
    inner = torch.einsum("bchw,nc->bnhw", xn, cn)
    torch.testing.assert_close(loss, -(inner.softmax(1) * inner).sum(1).mean())
    torch.testing.assert_close(log_probs, inner.log_softmax(1))


def test_blur_plan_is_a_function_of_seed_rank_and_step():
    cfg = _cfg(seed=3)
    a = blur_plan(cfg, 0, 10, 64)
    assert all(np.array_equal(x, y) for x, y in zip(a, blur_plan(cfg, 0, 10, 64), strict=True))
    assert not np.array_equal(a[1], blur_plan(cfg, 0, 11, 64)[1])
    assert not np.array_equal(a[1], blur_plan(cfg, 1, 10, 64)[1])
    apply, sigma = a
    assert 0 < apply.sum() < 64 and ((sigma >= 0.1) & (sigma <= 2.0)).all()


def test_blur_is_a_normalised_3x3_gaussian():
    image = torch.zeros(1, 1, 5, 5)
    image[0, 0, 2, 2] = 1.0  # an impulse: the output is the kernel itself
    out = blur(image.expand(1, 3, 5, 5).clone(), np.array([0.8]))[0, 0]
    g = np.exp(-np.array([-1.0, 0.0, 1.0]) ** 2 / (2 * 0.8**2))
    kernel = np.outer(g, g) / np.outer(g, g).sum()
    np.testing.assert_allclose(out[1:4, 1:4].numpy(), kernel, rtol=1e-5)
    assert float(out.sum()) == pytest.approx(1.0, rel=1e-6)


def test_augmented_features_run_the_backbone_only_on_blurred_images():
    seen = []

    def backbone(images):
        seen.append(images.shape[0])
        return torch.full((images.shape[0], C, GRID, GRID), 7.0)

    feats, _, images, _ = _batch(batch=4)
    apply = np.array([True, False, True, False])
    out = augmented_features(backbone, feats, images, apply, np.full(4, 1.0))
    assert seen == [2]
    torch.testing.assert_close(out[[1, 3]], feats[[1, 3]])
    assert (out[[0, 2]] == 7.0).all()
    assert augmented_features(backbone, feats, images, np.zeros(4, bool), np.ones(4)).equal(feats) and seen == [2]


def test_exported_head_equals_the_module_on_other_sizes(tmp_path):
    cfg = _cfg()
    modules = build_modules(cfg, C, CLASSES)
    head = eval_head(modules, cfg.alpha).eval()
    metadata = {"method": "eagle", "backbone": "dinov2_vits14", "backbone_weights_id": "random",
                "pretrained_backbone": False, "features": {"kind": "keys", "blocks": [-3, -2, -1]},
                "feature_dim": C, "resolution": 32, "n_classes": CLASSES, "n_clusters": CLASSES + 1,
                "code_dim": cfg.code_dim, "dataset": "camvid_sample", "probabilistic": False, "selected_by": "last"}
    save(tmp_path / "segmenter.pt2", head, torch.randn(2, C, 4, 4), metadata)
    segmenter = load(tmp_path / "segmenter.pt2")
    assert segmenter.metadata["features"] == {"kind": "keys", "blocks": [-3, -2, -1]}
    feats = torch.randn(2, C, 5, 7)
    with torch.no_grad():
        ours, theirs = head(feats), segmenter(feats)
    assert theirs["cluster_logits"].shape == (2, CLASSES + 1, 5, 7)
    for key in ("code", "cluster_logits", "linear_logits"):
        torch.testing.assert_close(theirs[key], ours[key], rtol=1e-5, atol=1e-5)
    # alpha 4 at evaluation: the logits are 4 x the cosine similarities to the centres
    inner = modules["cluster_probe"].inner(ours["code"])
    torch.testing.assert_close(ours["cluster_logits"], 4.0 * inner)


def test_a_keys_descriptor_the_backbone_cannot_produce_is_a_clear_error():
    from shared.backbone import build_backbone
    from shared.features import DescriptorError

    with pytest.raises(DescriptorError, match=r"names blocks \[-20\].*12 blocks"):
        build_backbone("dinov2_vits14", "none", features={"kind": "keys", "blocks": [-3, -2, -20]})
