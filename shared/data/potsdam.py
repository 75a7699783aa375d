"""Potsdam-6 and Potsdam-3: ISPRS Potsdam tiles stored as .mat files (keys `img` H x W x 4, `gt` H x W)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from shared.data.base import SegmentationDataset, make_lut, map_label, require
from shared.data.errors import BadSampleError, DatasetLayoutError

SPLIT_LISTS = {
    "train": "labelled_train", "val": "labelled_test", "labelled_train": "labelled_train",
    "labelled_test": "labelled_test", "unlabelled_train": "unlabelled_train", "all": "all",
}  # fmt: skip
POTSDAM6_CLASSES = ("impervious surfaces", "building", "low vegetation", "tree", "car", "clutter")
POTSDAM3_CLASSES = ("roads and cars", "buildings and clutter", "trees and vegetation")


def read_mat_key(path: Path, key: str) -> np.ndarray:
    """One array from a .mat file; a missing key or unreadable file raises BadSampleError naming both."""
    try:
        content = scipy.io.loadmat(str(path))
    except Exception as err:  # scipy raises several unrelated types for corrupt files
        raise BadSampleError(f"Cannot read {path} ({err}); re-create it, or delete it (and its image or label) "
                             "from the split.") from err
    if key not in content:
        keys = sorted(k for k in content if not k.startswith("__"))
        raise BadSampleError(f"{path} has no key {key!r} (keys: {keys}); expected a Potsdam .mat with {key!r}.")
    return np.asarray(content[key])


class Potsdam6(SegmentationDataset):
    """`potsdam/imgs/<id>.mat`, `potsdam/gt/<id>.mat`, split lists `potsdam/<list>.txt`."""

    name = "potsdam6"
    n_classes = 6
    class_names = POTSDAM6_CLASSES
    lut = make_lut({**{i: i for i in range(6)}, 255: -1})

    def __init__(self, data_root: Path, split: str, *, resolution: int = 224, on_bad: str = "error") -> None:
        if split not in SPLIT_LISTS:
            raise ValueError(f"{self.name} has no split {split!r}; use one of {sorted(SPLIT_LISTS)}.")
        super().__init__(Path(data_root) / "potsdam", split, resolution=resolution, on_bad=on_bad)
        make = f"python -m shared.data.prepare potsdam --src <folder with the ISPRS top_potsdam_*_RGBIR.tif " \
               f"and *_label.tif> --dst {data_root}"
        list_path = require(self.root / f"{SPLIT_LISTS[split]}.txt", "Potsdam split list", make)
        require(self.root / "imgs", "Potsdam image folder", make)
        ids = [line.strip() for line in list_path.read_text().splitlines() if line.strip()]
        samples = []
        for tile in ids:
            if not (self.root / "imgs" / f"{tile}.mat").exists():
                raise DatasetLayoutError(f"Potsdam tile {self.root / 'imgs' / f'{tile}.mat'} (listed in "
                                         f"{list_path}) is missing. Make it with: {make}")
            gt = f"gt/{tile}.mat"
            labelled = SPLIT_LISTS[split].startswith("labelled")
            if labelled and not (self.root / gt).exists():
                raise DatasetLayoutError(f"Potsdam label {self.root / gt} is missing. Make it with: {make}")
            # "unlabelled_train" has no labels by definition; "all" uses them where they exist.
            has_gt = SPLIT_LISTS[split] != "unlabelled_train" and (labelled or (self.root / gt).exists())
            samples.append((f"imgs/{tile}.mat", gt if has_gt else None))
        self._setup(samples)

    def _read_image(self, path: Path) -> np.ndarray:
        img = read_mat_key(path, "img")
        if img.ndim != 3 or img.shape[2] < 3:
            raise BadSampleError(f"{path} key 'img' has shape {img.shape}; expected (H, W, 4) RGB+IR.")
        rgb = img[:, :, :3]
        if rgb.dtype != np.uint8:
            # Some distributions store floats in [0, 1]; scale those, clip anything else to bytes.
            rgb = rgb.astype(np.float64)
            rgb = rgb * 255.0 if rgb.max(initial=0.0) <= 1.0 else rgb
            rgb = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(rgb)

    def _read_label(self, path: Path) -> np.ndarray:
        gt = read_mat_key(path, "gt")
        if gt.ndim != 2:
            raise BadSampleError(f"{path} key 'gt' has shape {gt.shape}; expected (H, W) class ids.")
        return map_label(gt.astype(np.int64), self.lut, path)


class Potsdam3(Potsdam6):
    """Potsdam with {0, 4} -> 0 roads and cars, {1, 5} -> 1 buildings and clutter, {2, 3} -> 2 vegetation."""

    name = "potsdam3"
    n_classes = 3
    class_names = POTSDAM3_CLASSES
    lut = make_lut({0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2, 255: -1})
