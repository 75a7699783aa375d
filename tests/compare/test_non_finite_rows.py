"""NaN or Inf in the features, the head's outputs or the scores makes a comparison row `failed` with the reason,
never `ok` with a NaN in a column. A tiny world: 4 images of 4x4 pixels, features on a 2x2 grid, a cosine head."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compare.evaluate import MethodResult, check_finite_result
from compare.run import CompareSettings, run_comparison
from shared.segmenter import save

N, C, GRID, RES, K = 4, 4, 2, 4, 3


class CosineHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("centres", torch.eye(K, C))

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        code = F.normalize(features, dim=1)
        return {"code": code, "cluster_logits": 10 * torch.einsum("bchw,kc->bkhw", code, self.centres)}


class Dataset(torch.utils.data.Dataset):
    name, split, n_classes, class_names, resolution, has_labels, cache_id = "toy", "val", K, ["a", "b", "c"], RES, \
        True, "toy"

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.zeros(3, RES, RES), "label": torch.zeros(RES, RES, dtype=torch.int64), "index": i}


class Backbone(nn.Module):
    name, patch_size, feature_dim, weights_id, pretrained = "dinov2_vits14", 2, C, "random-seed0", False
    descriptor = {"kind": "tokens", "layer": -1}

    def with_features(self, descriptor):
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.zeros(images.shape[0], C, GRID, GRID)


def cached(features: np.ndarray, labels: np.ndarray):
    return SimpleNamespace(features=features, labels=labels, key="toy", path="toy", meta={})


@pytest.fixture
def world(tmp_path, monkeypatch):
    import shared.backbone
    import shared.data
    import shared.data.feature_cache

    run_dir = tmp_path / "runs" / "cos" / "toy" / "a"
    metadata = {"method": "cos", "backbone": "dinov2_vits14", "backbone_weights_id": "random-seed0",
                "pretrained_backbone": False, "features": {"kind": "tokens", "layer": -1}, "feature_dim": C,
                "resolution": RES, "n_classes": K, "n_clusters": K, "code_dim": C, "dataset": "toy",
                "probabilistic": False, "selected_by": "last"}
    save(run_dir / "export" / "segmenter.pt2", CosineHead().eval(), torch.randn(2, C, GRID, GRID), metadata)
    state = SimpleNamespace(features=np.random.default_rng(0).random((N, C, GRID, GRID)).astype(np.float16) + 0.1,
                            labels=np.tile(np.arange(RES * RES).reshape(RES, RES) % K, (N, 1, 1)).astype(np.int16))
    monkeypatch.setattr(shared.data, "build_dataset", lambda *a, **k: Dataset())
    monkeypatch.setattr(shared.backbone, "build_backbone", lambda *a, **k: Backbone())
    monkeypatch.setattr(shared.data.feature_cache.FeatureCache, "get",
                        lambda self, backbone, ds, *, flip=False, **k: cached(state.features, state.labels))

    def compare():
        out = run_comparison(CompareSettings(dataset="toy", runs=[str(run_dir)], resolution=RES,
                                             out=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"),
                                             batch_size=2, device="cpu", crf=False, probe_split="", figure_rows=1,
                                             panel=16))
        (row,) = json.loads(out.paths["json"].read_text())["results"]
        return row

    return SimpleNamespace(state=state, compare=compare)


def test_finite_world_is_ok(world):
    row = world.compare()
    assert row["status"] == "ok", row["error"]
    assert math.isfinite(row["unsupervised"]["miou"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_make_the_row_failed_with_the_reason(world, bad):
    world.state.features = world.state.features.copy()
    world.state.features[1, 2, 0, 1] = bad
    row = world.compare()
    assert row["status"] == "failed"
    assert "NaN or Inf" in row["error"] and "FloatingPointError" in row["error"]
    assert row["unsupervised"] is None


def test_a_split_without_labelled_pixels_is_failed_not_a_nan_score(world):
    world.state.labels = np.full_like(world.state.labels, -1)  # every pixel ignored: accuracy 0/0
    row = world.compare()
    assert row["status"] == "failed", row
    assert "non-finite scores" in row["error"] and "unsupervised acc = nan" in row["error"]


def test_check_finite_result_names_each_bad_column():
    result = MethodResult(method="m", path="p", status="ok", unsupervised={"acc": 50.0, "miou": float("nan")},
                          calibration={"ece": 0.1, "nll": float("inf")}, images_per_s=3.0)
    with pytest.raises(FloatingPointError, match=r"unsupervised miou = nan, calibration nll = inf"):
        check_finite_result(result)
    check_finite_result(MethodResult(method="m", path="p", status="ok", unsupervised={"acc": 1.0, "miou": 2.0}))
