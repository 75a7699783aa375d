"""k-means baseline end to end: fit on the bundled sample (random backbone), export, reload."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from baselines.kmeans.config import KMeansConfig
from baselines.kmeans.kmeans import assign
from baselines.kmeans.train import main, sample_patch_vectors
from shared.config import load_config
from shared.segmenter import load


def test_sample_patch_vectors_reads_the_chosen_patches():
    feats = np.random.default_rng(0).normal(size=(3, 4, 2, 5)).astype(np.float16)
    vectors = sample_patch_vectors(feats, 7, seed=1)
    flat = feats.astype(np.float32).transpose(0, 2, 3, 1).reshape(-1, 4)  # (N*h*w, C) in image-major order
    chosen = np.sort(np.random.default_rng(1).choice(len(flat), size=7, replace=False))
    expected = F.normalize(torch.from_numpy(flat[chosen]), dim=1)
    torch.testing.assert_close(vectors, expected)
    assert len(sample_patch_vectors(feats, 1000, seed=1)) == 30  # capped at all patches


PINNED_MIOU = 10.88


def finished_centres(fitted) -> torch.Tensor:
    return fitted[1].head.centres


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("kmeans_fit")
    # One feature cache for the session: the STEGO end-to-end test builds the same (backbone, split, size) keys.
    cache = tmp_path_factory.getbasetemp() / "uss_feature_cache"
    cfg = load_config(KMeansConfig, None, ["dataset=camvid_sample", "backbone_weights=none", "resolution=28",
                                           "val_resolution=28", f"output_root={root}", f"cache_dir={cache}",
                                           "n_init=2", "linear_probe_steps=5", "crf_at_end=false"])
    finished = main(cfg)
    return cfg, finished, Path(root) / "kmeans" / "camvid_sample" / "default"


def test_fit_writes_an_export_and_scores(fitted):
    cfg, finished, run_dir = fitted
    metrics = finished.metrics
    assert (run_dir / "config.yaml").is_file() and (run_dir / "final_metrics.json").is_file()
    # Deterministic: random backbone from seed 0, seeded k-means (pinned, loose tolerance for other CPUs).
    assert metrics["n_clusters"] == 11 and metrics["unsupervised/miou"] == pytest.approx(PINNED_MIOU, abs=0.5)
    assert "linear/miou" in metrics  # the method's own probe diagnostic (linear_probe_steps > 0)
    meta = load(run_dir / "export" / "segmenter.pt2").metadata
    assert (meta["method"], meta["n_clusters"], meta["code_dim"], meta["pretrained_backbone"]) == \
        ("kmeans", 11, 384, False)


def test_exported_clusters_are_the_kmeans_assignment(fitted):
    cfg, _, run_dir = fitted
    segmenter = load(run_dir / "export" / "segmenter.pt2")
    centres = F.normalize(finished_centres(fitted), dim=1)
    x = torch.randn(3, 384, 2, 2)
    with torch.no_grad():
        out = segmenter(x)
    expected_labels, _ = assign(F.normalize(x.permute(0, 2, 3, 1).reshape(-1, 384), dim=1), centres)
    assert torch.equal(out["cluster_logits"].argmax(1).flatten(), expected_labels)
    expected_logits = cfg.alpha * torch.einsum("bchw,kc->bkhw", F.normalize(x, dim=1), centres)
    torch.testing.assert_close(out["cluster_logits"], expected_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["code"], F.normalize(x, dim=1))
