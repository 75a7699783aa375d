"""Tiny datasets written in the real on-disk formats, for the data tests (imported by test_data_*.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
import torch
from PIL import Image


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def save_image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_coco(root: Path, labels: dict[str, np.ndarray], split: str = "val2017",
              list_name: str = "Coco164kFull_Stuff_Coarse_7.txt") -> Path:
    """`root/cocostuff/...` with one jpg + fine-id png per id, and a curated list of all ids."""
    base = root / "cocostuff"
    for i, (image_id, fine) in enumerate(labels.items()):
        save_image(base / "images" / split / f"{image_id}.jpg", rgb(*fine.shape, seed=i))
        save_image(base / "annotations" / split / f"{image_id}.png", fine.astype(np.uint8))
    (base / "curated" / split).mkdir(parents=True, exist_ok=True)
    (base / "curated" / split / list_name).write_text("".join(f"{k}\n" for k in labels))
    return root


def make_cityscapes(root: Path, labels: dict[str, np.ndarray], split: str = "val", city: str = "lindau") -> Path:
    base = root / "cityscapes"
    for i, (name, ids) in enumerate(labels.items()):
        save_image(base / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", rgb(*ids.shape, seed=i))
        save_image(base / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", ids.astype(np.uint8))
    return root


def make_potsdam(root: Path, tiles: dict[str, np.ndarray], lists: dict[str, list[str]]) -> Path:
    """`root/potsdam/imgs/<id>.mat` (img H x W x 4 uint8), `gt/<id>.mat`, and the split lists."""
    base = root / "potsdam"
    (base / "imgs").mkdir(parents=True, exist_ok=True)
    (base / "gt").mkdir(parents=True, exist_ok=True)
    for i, (tile, gt) in enumerate(tiles.items()):
        img = np.random.default_rng(i).integers(0, 256, size=(*gt.shape, 4), dtype=np.uint8)
        scipy.io.savemat(base / "imgs" / f"{tile}.mat", {"img": img})
        scipy.io.savemat(base / "gt" / f"{tile}.mat", {"gt": gt.astype(np.uint8)})
    for name, ids in lists.items():
        (base / f"{name}.txt").write_text("".join(f"{t}\n" for t in ids))
    return root


def make_folder(root: Path, labels: dict[str, np.ndarray | None], split: str = "train") -> Path:
    for i, (stem, ids) in enumerate(labels.items()):
        h, w = (16, 20) if ids is None else ids.shape
        save_image(root / "images" / split / f"{stem}.jpg", rgb(h, w, seed=i))
        if ids is not None:
            save_image(root / "labels" / split / f"{stem}.png", ids.astype(np.uint8))
    return root


class FakeBackbone(torch.nn.Module):
    """A patch-embedding 'ViT' with the FrozenBackbone attributes; counts images it has seen."""

    def __init__(self, patch_size: int = 8, dim: int = 6, weights_id: str = "fake-w0", layer: int = -1) -> None:
        super().__init__()
        self.name, self.weights_id, self.layer = "fake_vit", weights_id, layer
        self.descriptor = {"kind": "tokens", "layer": layer}
        self.patch_size, self.feature_dim, self.use_bf16, self.pretrained = patch_size, dim, False, False
        gen = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Conv2d(3, dim, patch_size, stride=patch_size)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=gen))
            self.proj.bias.copy_(torch.randn(self.proj.bias.shape, generator=gen))
        self.images_seen = 0
        self.fail_after: int | None = None  # raise once this many images were seen (an interrupted build)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) -> (B, dim, R/p, R/p)."""
        if self.fail_after is not None and self.images_seen >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.images_seen += images.shape[0]
        return self.proj(images)
