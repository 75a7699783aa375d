"""kNN files: shape, dtype, self first (even with duplicates), equality with brute force, reuse."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from data_fixtures import FakeBackbone, make_folder

from shared.data import build_dataset
from shared.data.knn import knn_path, load_or_compute_knn, topk_cosine


def brute_force(features: np.ndarray, k: int) -> np.ndarray:
    """float64 reference: full cosine matrix, self first, then by descending similarity."""
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    sims = f @ f.T
    np.fill_diagonal(sims, np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def test_topk_matches_brute_force_across_chunks():
    feats = torch.randn(50, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = topk_cosine(torch.nn.functional.normalize(feats, dim=1), 9, chunk_size=8)
    assert got.dtype == np.int64 and got.shape == (50, 9)
    np.testing.assert_array_equal(got, brute_force(feats.numpy(), 9))


def test_self_first_with_duplicate_images(tmp_path):
    same = np.tile(np.arange(8), (6, 1)) % 3
    make_folder(tmp_path / "camvid", {f"d{i}": same for i in range(4)})
    for i in range(1, 4):  # identical images: every pair is at similarity 1
        shutil.copyfile(tmp_path / "camvid" / "images" / "train" / "d0.jpg",
                        tmp_path / "camvid" / "images" / "train" / f"d{i}.jpg")
    ds = build_dataset("camvid", "train", data_root=tmp_path, resolution=16)
    nns = load_or_compute_knn(FakeBackbone(), ds, k=4, nns_dir=tmp_path / "nns", progress=False)
    assert nns[:, 0].tolist() == [0, 1, 2, 3]
    assert all(sorted(row) == [0, 1, 2, 3] for row in nns.tolist())


def test_load_or_compute_equals_reference_and_is_reused(tmp_path):
    rng = np.random.default_rng(1)
    make_folder(tmp_path / "camvid", {f"f{i:02d}": rng.integers(0, 11, (16, 16)) for i in range(12)})
    ds = build_dataset("camvid", "train", data_root=tmp_path, resolution=16)
    backbone = FakeBackbone()
    backbone.train()  # must be switched to eval for the computation and back afterwards
    nns = load_or_compute_knn(backbone, ds, k=5, nns_dir=tmp_path / "nns", batch_size=5, progress=False)
    assert backbone.training
    with torch.no_grad():
        pooled = torch.cat([FakeBackbone()(ds[i]["image"][None]) for i in range(len(ds))]).mean((2, 3))
    np.testing.assert_array_equal(nns, brute_force(pooled.double().numpy(), 5))
    path = knn_path(backbone, ds, tmp_path / "nns")
    assert path.name == "nns_fake_vit_camvid_train_center_16.npz"
    with np.load(path) as data:
        np.testing.assert_array_equal(data["nns"], nns)
    seen = backbone.images_seen
    again = load_or_compute_knn(backbone, ds, k=3, nns_dir=tmp_path / "nns", progress=False)
    assert backbone.images_seen == seen
    np.testing.assert_array_equal(again, nns[:, :3])
    other_backbone = FakeBackbone(weights_id="other")
    other = load_or_compute_knn(other_backbone, ds, k=3, nns_dir=tmp_path / "nns", progress=False)
    assert other_backbone.images_seen == 12 and other.shape == (12, 3)  # different weights: recomputed, not reused


def test_k_larger_than_split_is_a_clear_error():
    with pytest.raises(ValueError, match="k=5.*only 3"):
        topk_cosine(torch.eye(3), 5)


def test_computing_knn_leaves_the_global_random_stream_alone(tmp_path):
    rng = np.random.default_rng(0)
    make_folder(tmp_path / "camvid", {f"f{i}": rng.integers(0, 12, size=(24, 32)) for i in range(4)})
    dataset = build_dataset("camvid", "train", data_root=tmp_path, resolution=16)
    backbone = FakeBackbone()  # built first: its Conv2d initialisation draws from the global stream
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_or_compute_knn(backbone, dataset, k=3, nns_dir=tmp_path / "nns", progress=False)
    assert torch.equal(torch.rand(3), expected)
