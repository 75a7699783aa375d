"""kNN files: shape, dtype, self first (even with duplicates), equality with brute force, reuse."""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import warnings

import numpy as np
import pytest
import torch
from data_fixtures import FakeBackbone, make_folder

from shared.data import build_dataset
from shared.data.feature_cache import FeatureCache
from shared.data.knn import knn_from_cache, knn_from_cache_path, knn_path, load_or_compute_knn, topk_cosine


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


class _TouchOnLoad:
    """Unpickling this creates `marker` (a payload inside an .npz's object array)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def small_camvid(root, n=6):
    rng = np.random.default_rng(2)
    make_folder(root / "camvid", {f"f{i}": rng.integers(0, 11, (16, 16)) for i in range(n)})
    return build_dataset("camvid", "train", data_root=root, resolution=16)


def write_npz_with_object_array(path, marker, **fields):
    np.savez(path, nns=np.array([_TouchOnLoad(marker)], dtype=object), **fields)


def assert_recomputed_unrun(path, nns, expected, marker):
    """The crafted file ran nothing, was not trusted, and was replaced by a plain array file."""
    assert not marker.exists()
    np.testing.assert_array_equal(nns, expected)
    with np.load(path, allow_pickle=False) as data:
        np.testing.assert_array_equal(data["nns"], expected)


def test_a_crafted_knn_file_runs_nothing_and_is_recomputed(tmp_path, crafted_file):
    ds = small_camvid(tmp_path)
    expected = load_or_compute_knn(FakeBackbone(), ds, k=3, nns_dir=tmp_path / "clean", progress=False)
    path = knn_path(FakeBackbone(), ds, tmp_path / "nns")
    crafted = crafted_file(f"nns/{path.name}", {"nns": torch.zeros(6, 3, dtype=torch.long)})
    nns = load_or_compute_knn(FakeBackbone(), ds, k=3, nns_dir=tmp_path / "nns", progress=False)
    assert_recomputed_unrun(crafted.path, nns, expected, crafted.marker)


def test_an_npz_with_a_pickled_object_array_runs_nothing(tmp_path):
    ds = small_camvid(tmp_path)
    backbone = FakeBackbone()
    expected = load_or_compute_knn(backbone, ds, k=3, nns_dir=tmp_path / "clean", progress=False)
    path, marker = knn_path(backbone, ds, tmp_path / "nns"), tmp_path / "payload-ran"
    path.parent.mkdir()
    write_npz_with_object_array(path, marker, weights_id=np.array(backbone.weights_id),
                                layer=np.array(backbone.layer), cache_id=np.array(ds.cache_id))
    nns = load_or_compute_knn(backbone, ds, k=3, nns_dir=tmp_path / "nns", progress=False)
    assert_recomputed_unrun(path, nns, expected, marker)


def test_a_crafted_knn_file_of_a_feature_cache_runs_nothing(tmp_path, crafted_file):
    cached = FeatureCache(tmp_path / "cache").get(FakeBackbone(), small_camvid(tmp_path), progress=False)
    expected = knn_from_cache(cached, k=3, nns_dir=tmp_path / "clean")
    path = knn_from_cache_path(cached, tmp_path / "nns")
    crafted = crafted_file(f"nns/{path.name}", {"nns": torch.zeros(6, 3, dtype=torch.long)})
    assert_recomputed_unrun(path, knn_from_cache(cached, k=3, nns_dir=tmp_path / "nns"), expected, crafted.marker)
    write_npz_with_object_array(path, crafted.marker, cache_key=np.array(cached.key))
    assert_recomputed_unrun(path, knn_from_cache(cached, k=3, nns_dir=tmp_path / "nns"), expected, crafted.marker)


def test_a_rebuilt_cache_with_other_bytes_never_reuses_the_old_knn_file(tmp_path):
    cached = FeatureCache(tmp_path / "cache").get(FakeBackbone(), small_camvid(tmp_path, n=8), progress=False)
    old = knn_from_cache(cached, k=3, nns_dir=tmp_path / "nns")
    # The same key, other bytes (and so another recorded digest): what a rebuild after a failed check can give.
    features = np.random.default_rng(5).standard_normal((8, 6, 2, 2)).astype(np.float16)
    rebuilt = dataclasses.replace(cached, features=features, meta={**cached.meta, "features_sha1": "f" * 40})
    expected = brute_force(features.astype(np.float64).mean((2, 3)), 3)
    assert not np.array_equal(old, expected)  # the test would be vacuous if the neighbours agreed
    with pytest.warns(UserWarning, match=r"nns_.*cache_sha1 differ.*recomputing"):
        np.testing.assert_array_equal(knn_from_cache(rebuilt, k=3, nns_dir=tmp_path / "nns"), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(knn_from_cache(rebuilt, k=3, nns_dir=tmp_path / "nns"), expected)


@pytest.mark.parametrize("from_cache", [True, False])
def test_a_knn_file_edited_in_place_is_recomputed_with_a_warning(tmp_path, from_cache):
    ds, backbone = small_camvid(tmp_path), FakeBackbone()
    cached = FeatureCache(tmp_path / "cache").get(backbone, ds, progress=False)

    def knn():
        if from_cache:
            return knn_from_cache(cached, k=3, nns_dir=tmp_path / "nns")
        return load_or_compute_knn(backbone, ds, k=3, nns_dir=tmp_path / "nns", progress=False)

    good = knn()
    path = knn_from_cache_path(cached, tmp_path / "nns") if from_cache else knn_path(backbone, ds, tmp_path / "nns")
    with np.load(path) as data:
        fields = dict(data)
    fields["nns"] = fields["nns"].copy()
    fields["nns"][2, 1], fields["nns"][2, 2] = fields["nns"][2, 2], fields["nns"][2, 1]  # valid-looking, wrong
    np.savez(path, **fields)
    with pytest.warns(UserWarning, match=rf"{path.name} does not match its recorded digest .*; recomputing"):
        np.testing.assert_array_equal(knn(), good)
