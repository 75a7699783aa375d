"""A synthetic world for the comparison (fixtures re-exported by conftest.py): 4 images of 4x4 pixels whose backbone
features are constant per image (so every method's prediction is one cluster per image, flip-invariant and
known), and two exported segmenters.

Features (C = 4): image i has feature e_i everywhere, on a 2x2 patch grid.
Method A (3 clusters, identity code): centres e0, e1, (e2 + e3)/sqrt2 -> clusters per image [0, 1, 2, 2];
    linear probe W = [[1,0,0,1],[0,1,0,0],[0,0,1,0]] -> classes per image [0, 1, 2, 0].
Method B (3 clusters, probabilistic): centres (e0 + e1)/sqrt2, e2, e3 -> clusters per image [0, 0, 1, 2].
Labels (3 classes, 16 pixels each): image 0: 10 x class 0, 4 x class 1, 2 ignored; image 1: 12 x 1, 4 x 2;
    image 2: 16 x 2; image 3: 8 x 2, 8 x 0.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

N_IMAGES, RES, GRID, DIM, N_CLASSES = 4, 4, 2, 4, 3
ALPHA = 10.0
WEIGHTS_ID = "random-seed0"
S = 1 / math.sqrt(2)


def toy_labels() -> np.ndarray:
    """(4, 4, 4) int16 labels as described in the module docstring."""
    labels = np.zeros((N_IMAGES, RES, RES), dtype=np.int16)
    flat = labels.reshape(N_IMAGES, -1)
    flat[0, :10], flat[0, 10:14], flat[0, 14:] = 0, 1, -1
    flat[1, :12], flat[1, 12:] = 1, 2
    flat[2, :] = 2
    flat[3, :8], flat[3, 8:] = 2, 0
    return labels


def toy_features(flip: bool = False) -> np.ndarray:
    """(4, 4, 2, 2) float16: e_i everywhere for image i (its flip is the same)."""
    feats = np.zeros((N_IMAGES, DIM, GRID, GRID), dtype=np.float16)
    for i in range(N_IMAGES):
        feats[i, i] = 1.0
    return feats


class ToyDataset(torch.utils.data.Dataset):
    """Stands in for a SegmentationDataset: seeded random images, the toy labels."""

    name = "camvid_sample"  # borrow a real dataset's fixed palette
    split = "val"
    n_classes = N_CLASSES
    class_names = ["a", "b", "c"]
    resolution = RES
    has_labels = True
    cache_id = "toy"

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randn(N_IMAGES, 3, RES, RES, generator=gen)
        self.labels = torch.from_numpy(toy_labels().astype(np.int64))

    def __len__(self) -> int:
        return N_IMAGES

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i], "index": i}


class ToyBackbone(torch.nn.Module):
    """A 'backbone' that maps images to constant (B, 4, 2, 2) features; only timed, never cached."""

    name, patch_size, feature_dim, layer = "dinov2_vits14", 2, DIM, -1
    weights_id, pretrained, use_bf16 = WEIGHTS_ID, False, False
    descriptor = {"kind": "tokens", "layer": -1}

    def with_features(self, descriptor: dict) -> ToyBackbone:
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.zeros(images.shape[0], DIM, GRID, GRID)


def cached(flip: bool):
    from shared.data.feature_cache import CachedFeatures

    return CachedFeatures(features=toy_features(flip), labels=toy_labels(), key=f"toy-{flip}", meta={},
                          path=Path("toy"))


def metadata(method: str, n_clusters: int, probabilistic: bool) -> dict:
    return {"method": method, "backbone": "dinov2_vits14", "backbone_weights_id": WEIGHTS_ID,
            "pretrained_backbone": False, "features": {"kind": "tokens", "layer": -1}, "resolution": RES,
            "n_classes": N_CLASSES, "n_clusters": n_clusters, "code_dim": DIM, "dataset": "toy",
            "probabilistic": probabilistic, "selected_by": "last"}


CENTRES_A = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, S, S]], dtype=torch.float32)
CENTRES_B = torch.tensor([[S, S, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float32)
LINEAR_A = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.float32)


class ToyHead(torch.nn.Module):
    """code = the features; cluster logits = ALPHA * cos(code, centres); A also has a linear probe, B (the
    probabilistic one) a variance output 1 + feature 3 + the column index (so it varies along the width)."""

    def __init__(self, centres: torch.Tensor, linear: torch.Tensor | None, variance: bool) -> None:
        super().__init__()
        self.register_buffer("centres", torch.nn.functional.normalize(centres, dim=1))
        self.linear = None if linear is None else torch.nn.Conv2d(DIM, N_CLASSES, 1)
        if linear is not None:
            with torch.no_grad():
                self.linear.weight.copy_(linear[:, :, None, None])
                self.linear.bias.zero_()
        self.variance = variance

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        code = features
        cos = torch.einsum("bchw,kc->bkhw", torch.nn.functional.normalize(code, dim=1), self.centres)
        out = {"code": code, "cluster_logits": ALPHA * cos}
        if self.linear is not None:
            out["linear_logits"] = self.linear(code)
        if self.variance:
            columns = torch.arange(features.shape[-1], dtype=features.dtype)
            out["variance"] = 1 + features[:, 3] + columns.view(1, 1, -1)
        return out


def save_toy_segmenter(path: Path, which: str) -> Path:
    from shared.segmenter import save

    example = torch.from_numpy(toy_features().astype(np.float32))
    if which == "a":
        save(path, ToyHead(CENTRES_A, LINEAR_A, False), example, metadata("method_a", 3, False))
    else:
        save(path, ToyHead(CENTRES_B, None, True), example, metadata("method_b", 3, True))
    return path


@pytest.fixture
def toy_world(tmp_path, monkeypatch):
    """Two run directories (A, B) and the fakes for dataset, backbone and feature cache wired into shared."""
    import shared.backbone
    import shared.data
    import shared.data.feature_cache

    runs = {}
    for which in ("a", "b"):
        run_dir = tmp_path / "runs" / f"method_{which}" / "toy" / "demo"
        (run_dir / "export").mkdir(parents=True)
        save_toy_segmenter(run_dir / "export" / "segmenter.pt2", which)
        runs[which] = str(run_dir)
    dataset = ToyDataset()
    monkeypatch.setattr(shared.data, "build_dataset", lambda *a, **k: dataset)
    monkeypatch.setattr(shared.backbone, "build_backbone", lambda *a, **k: ToyBackbone())
    monkeypatch.setattr(shared.data.feature_cache.FeatureCache, "get",
                        lambda self, backbone, ds, *, flip=False, **k: cached(flip))
    return SimpleNamespace(runs=runs, dataset=dataset, out=tmp_path / "out", tmp=tmp_path)
