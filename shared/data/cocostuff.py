"""COCO-Stuff-27: the curated COCO-Stuff 164k lists, fine ids 0-181 merged into 27 coarse classes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from shared.data.base import SegmentationDataset, make_lut, map_label, read_label_png, require
from shared.data.errors import DatasetLayoutError

COARSE_CLASSES = (
    "electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen", "accessory", "animal",
    "outdoor", "person", "sports", "vehicle",
    "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial", "textile", "wall", "window", "building",
    "ground", "plant", "sky", "solid", "structural", "water",
)  # fmt: skip
SPLIT_FOLDERS = {"train": "train2017", "val": "val2017", "train2017": "train2017", "val2017": "val2017"}
# The curated lists of STEGO/PiCIE: "_7" is the standard evaluation list, the plain one the training list.
DEFAULT_LISTS = {"train2017": "Coco164kFull_Stuff_Coarse.txt", "val2017": "Coco164kFull_Stuff_Coarse_7.txt"}
MAPPING_FILE = Path(__file__).parent / "assets" / "cocostuff_fine_to_coarse27.json"


def fine_to_coarse_lut() -> np.ndarray:
    """(256,) int64: fine id 0-181 -> coarse 0-26, 255 -> -1, every other id INVALID."""
    mapping = {int(k): int(v) for k, v in json.loads(MAPPING_FILE.read_text()).items()}
    mapping[255] = -1
    return make_lut(mapping)


class CocoStuff27(SegmentationDataset):
    """`cocostuff/images/<split>/<id>.jpg`, `cocostuff/annotations/<split>/<id>.png`, curated id lists."""

    name = "cocostuff27"
    n_classes = 27
    class_names = COARSE_CLASSES

    def __init__(self, data_root: Path, split: str, *, resolution: int = 224, on_bad: str = "error",
                 curated_list: str | None = None) -> None:
        if split not in SPLIT_FOLDERS:
            raise ValueError(f"cocostuff27 has no split {split!r}; use one of {sorted(SPLIT_FOLDERS)}.")
        super().__init__(Path(data_root) / "cocostuff", split, resolution=resolution, on_bad=on_bad)
        folder = SPLIT_FOLDERS[split]
        self.curated_list = curated_list or DEFAULT_LISTS[folder]
        make = f"python -m shared.data.prepare cocostuff --src <folder with train2017.zip, val2017.zip, " \
               f"stuffthingmaps_trainval2017.zip> --dst {data_root}"
        image_dir = require(self.root / "images" / folder, "COCO-Stuff image folder", make)
        label_dir = require(self.root / "annotations" / folder, "COCO-Stuff annotation folder", make)
        list_path = require(
            self.root / "curated" / folder / self.curated_list, "COCO-Stuff curated list",
            f"python -m shared.data.prepare cocostuff --src <...> --dst {data_root} --ids-file <ids.txt> "
            f"--ids-split {folder} --list-name {self.curated_list}",
        )
        ids = [line.strip() for line in list_path.read_text().splitlines() if line.strip()]
        # One directory listing each (not a stat per file): the training list has ~118k ids.
        for directory, suffix in ((image_dir, ".jpg"), (label_dir, ".png")):
            present = {entry.name for entry in os.scandir(directory)}
            missing = [f"{i}{suffix}" for i in ids if f"{i}{suffix}" not in present]
            if missing:
                raise DatasetLayoutError(f"{len(missing)} file(s) listed in {list_path} are missing from {directory}, "
                                         f"e.g. {missing[0]}. Make them with: {make}")
        self._lut = fine_to_coarse_lut()
        self._setup([(f"images/{folder}/{i}.jpg", f"annotations/{folder}/{i}.png") for i in ids])

    def _cache_extra(self) -> str:
        return self.curated_list

    def _read_label(self, path: Path) -> np.ndarray:
        return map_label(read_label_png(path), self._lut, path)
