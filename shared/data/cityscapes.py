"""Cityscapes-27: fine labelIds shifted by 7 (ids 7-33 -> 0-26, everything else ignored)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.data.base import SegmentationDataset, make_lut, map_label, read_label_png, require
from shared.data.errors import DatasetLayoutError

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge", "tunnel",
    "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
)  # fmt: skip
LUT = make_lut({i: (i - 7 if i >= 7 else -1) for i in range(34)}, size=34)


class Cityscapes27(SegmentationDataset):
    """`cityscapes/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png` + `gtFine/.../<name>_gtFine_labelIds.png`."""

    name = "cityscapes27"
    n_classes = 27
    class_names = CITYSCAPES_CLASSES

    def __init__(self, data_root: Path, split: str, *, resolution: int = 224, on_bad: str = "error") -> None:
        super().__init__(Path(data_root) / "cityscapes", split, resolution=resolution, on_bad=on_bad)
        make = f"python -m shared.data.prepare cityscapes --src <folder with leftImg8bit_trainvaltest.zip, " \
               f"gtFine_trainvaltest.zip> --dst {data_root}"
        image_dir = require(self.root / "leftImg8bit" / split, "Cityscapes image folder", make)
        require(self.root / "gtFine" / split, "Cityscapes gtFine folder", make)
        samples = []
        for image in sorted(image_dir.glob("*/*_leftImg8bit.png")):
            rel = image.relative_to(self.root).as_posix()
            label = rel.replace("leftImg8bit/", "gtFine/", 1).replace("_leftImg8bit.png", "_gtFine_labelIds.png")
            if not (self.root / label).exists():
                raise DatasetLayoutError(f"Cityscapes label {self.root / label} is missing for {image}. "
                                         f"Make it with: {make}")
            samples.append((rel, label))
        if not samples:
            raise DatasetLayoutError(f"No *_leftImg8bit.png under {image_dir}/<city>/. Make them with: {make}")
        self._setup(samples)

    def _read_label(self, path: Path) -> np.ndarray:
        # The spec ignores ids above 33 rather than rejecting them (255 appears in some re-encodings).
        return map_label(read_label_png(path), LUT, path, beyond=-1)
