"""The five-crop training sets: `cropped/<dataset>_five_crop_0.5/{img,label}/<split>/<5*i+k>.{jpg,png}`.

Labels are stored as class id + 1 (0 = ignore), the convention of STEGO's cropped sets, so uint8 PNGs hold -1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.data.base import SegmentationDataset, make_lut, map_label, read_label_png, require
from shared.data.errors import DatasetLayoutError

CROP_RATIO = 0.5


def five_crop_dir(data_root: Path, dataset_name: str) -> Path:
    return Path(data_root) / "cropped" / f"{dataset_name}_five_crop_{CROP_RATIO}"


class FiveCropDataset(SegmentationDataset):
    """Reads a five-crop set written by `prepare five_crop`; classes are those of `base_cls`."""

    crop_type = "five"

    def __init__(self, base_cls: type[SegmentationDataset], data_root: Path, split: str, *,
                 resolution: int = 224, on_bad: str = "error", n_classes: int | None = None,
                 class_names: tuple[str, ...] | None = None, ignore_id: int | None = None) -> None:
        del ignore_id  # crops store id + 1 with 0 = ignore, whatever the source's ignore id was
        self.name = base_cls.name
        self.n_classes = int(n_classes) if n_classes is not None else base_cls.n_classes
        self.class_names = tuple(class_names) if class_names else (
            base_cls.class_names or tuple(f"class_{i}" for i in range(self.n_classes)))
        super().__init__(five_crop_dir(data_root, base_cls.name), split, resolution=resolution, on_bad=on_bad)
        make = f"python -m shared.data.prepare five_crop --dataset {self.name} --split {split} " \
               f"--src {data_root} --dst {data_root}"
        image_dir = require(self.root / "img" / split, "five-crop image folder", make)
        images = sorted(image_dir.glob("*.jpg"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1)
        if not images:
            raise DatasetLayoutError(f"No crops (<n>.jpg) in {image_dir}. Make them with: {make}")
        label_dir = self.root / "label" / split
        samples = []
        for image in images:
            label = f"label/{split}/{image.stem}.png"
            if label_dir.is_dir() and not (self.root / label).exists():
                raise DatasetLayoutError(f"Five-crop label {self.root / label} is missing. Make it with: {make}")
            samples.append((f"img/{split}/{image.name}", label if label_dir.is_dir() else None))
        self._lut = make_lut({0: -1, **{c + 1: c for c in range(self.n_classes)}})
        self._setup(samples)

    def _read_label(self, path: Path) -> np.ndarray:
        return map_label(read_label_png(path), self._lut, path)
