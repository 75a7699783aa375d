"""Datasets, views, feature cache and kNN files shared by every method.

    from shared.data import build_dataset, DATASET_NAMES, IMAGENET_MEAN, IMAGENET_STD
"""

from __future__ import annotations

import os

from shared.data.base import SegmentationDataset, resolve_data_root
from shared.data.cityscapes import Cityscapes27
from shared.data.cocostuff import CocoStuff27
from shared.data.errors import BadSampleError, DatasetLayoutError
from shared.data.five_crop import FiveCropDataset
from shared.data.folder import CamVid, CamVidSample, FolderDataset
from shared.data.potsdam import Potsdam3, Potsdam6
from shared.data.transforms import IMAGENET_MEAN, IMAGENET_STD

DATASETS: dict[str, type[SegmentationDataset]] = {
    "cocostuff27": CocoStuff27,
    "cityscapes27": Cityscapes27,
    "potsdam3": Potsdam3,
    "potsdam6": Potsdam6,
    "camvid": CamVid,
    "camvid_sample": CamVidSample,
    "folder": FolderDataset,
}
DATASET_NAMES = tuple(DATASETS)


def build_dataset(name: str, split: str, *, data_root: str | os.PathLike | None = None, resolution: int = 224,
                  five_crop: bool = False, **options) -> SegmentationDataset:
    """Build a dataset by name. data_root: `data_root` or $USS_DATA or ./data ("folder": the folder itself).

    options: on_bad="error" (a bad file raises BadSampleError when read) or "skip" (every sample is read once
    now, bad ones are dropped with one warning; see ds.skipped / ds.n_skipped) for all datasets;
    "folder" also takes n_classes, ignore_id (default 255), class_names;
    "cocostuff27" takes curated_list. five_crop=True reads `<data_root>/cropped/<name>_five_crop_0.5/`.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}.")
    cls = DATASETS[name]
    root = resolve_data_root(data_root)
    if five_crop:
        return FiveCropDataset(cls, root, split, resolution=resolution, **options)
    return cls(root, split, resolution=resolution, **options)


__all__ = [
    "DATASETS", "DATASET_NAMES", "IMAGENET_MEAN", "IMAGENET_STD", "BadSampleError", "DatasetLayoutError",
    "SegmentationDataset", "build_dataset",
]  # fmt: skip
