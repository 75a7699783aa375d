"""The common dataset class: a list of (image, label) files under a root, read, checked, mapped and cropped."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from shared.data.errors import BadSampleError, DatasetLayoutError
from shared.data.transforms import VIEW_VERSION, eval_view

INVALID = -2  # marks label ids that a dataset does not know; any such id is a bad sample


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    """`data_root`, else $USS_DATA, else ./data."""
    return Path(data_root or os.environ.get("USS_DATA") or "data")


def require(path: Path, what: str, command: str) -> Path:
    """Return `path` if it exists, else raise DatasetLayoutError naming it and the command that makes it."""
    if not path.exists():
        raise DatasetLayoutError(f"{what} not found: {path}. Make it with: {command}")
    return path


def make_lut(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    """Lookup table raw id -> class id (-1 ignore); ids absent from `mapping` map to INVALID."""
    lut = np.full(size, INVALID, dtype=np.int64)
    for raw, cls in mapping.items():
        lut[raw] = cls
    return lut


def read_rgb(path: Path) -> np.ndarray:
    """Decode an image file fully to (H, W, 3) uint8; a truncated or unreadable file raises BadSampleError."""
    try:
        with Image.open(path) as im:
            im.load()  # decodes every byte, so truncation is found here and not later in a worker
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:
        raise BadSampleError(f"Cannot read image {path} ({err}); re-extract it, or delete it (and its label) from "
                             "the split.") from err


def read_label_png(path: Path) -> np.ndarray:
    """Decode a single-channel id map (L, P, I;16 or I PNG) to (H, W) int64 raw ids."""
    try:
        with Image.open(path) as im:
            im.load()
            raw = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as err:
        raise BadSampleError(f"Cannot read label {path} ({err}); re-extract it, or delete it (and its image) from "
                             "the split.") from err
    if raw.ndim != 2:
        raise BadSampleError(f"Label {path} has shape {raw.shape}; expected a single-channel (H, W) map of class ids.")
    return raw.astype(np.int64)


def map_label(raw: np.ndarray, lut: np.ndarray, path: Path, beyond: int | None = None) -> np.ndarray:
    """Map raw ids (H, W) through `lut`; ids past the table map to `beyond`, or are an error when it is None."""
    if raw.size and (raw.min() < 0 or (beyond is None and raw.max() >= len(lut))):
        bad = raw[(raw < 0) | (raw >= len(lut))]
        raise BadSampleError(f"Label {path} contains id {int(bad[0])}, outside the known ids of this dataset; "
                             "re-create the file from the official release, or delete it (and its image) from the "
                             "split.")
    clipped = np.clip(raw, 0, len(lut) - 1)
    out = lut[clipped]
    if beyond is not None:
        out = np.where(raw >= len(lut), beyond, out)
    if (out == INVALID).any():
        unknown = sorted(set(np.unique(raw[out == INVALID]).tolist()))
        raise BadSampleError(f"Label {path} contains ids {unknown[:10]}, which this dataset does not define; "
                             "check the folder dataset's classes.txt and ignore id 255, re-create the file, or "
                             "delete it (and its image) from the split.")
    return out


class SegmentationDataset(Dataset):
    """Base class. Subclasses set `name`, `n_classes`, `class_names` and call `_setup(samples)`.

    ds[i] -> {"image": (3, R, R) float32 ImageNet-normalised, "label": (R, R) int64 (-1 ignore), "index": i}.
    """

    name: str = ""
    n_classes: int = 0
    class_names: tuple[str, ...] = ()
    crop_type: str = "center"

    def __init__(self, root: Path, split: str, *, resolution: int = 224, on_bad: str = "error") -> None:
        if on_bad not in ("error", "skip"):
            raise ValueError(f"on_bad={on_bad!r} is not supported; use 'error' or 'skip'.")
        self.root = Path(root)
        self.split = split
        self.resolution = int(resolution)
        self.on_bad = on_bad
        self.samples: list[tuple[str, str | None]] = []
        self.skipped: list[str] = []
        self._cache_id: str | None = None

    # --- subclass hooks -------------------------------------------------------------------------------------
    def _read_image(self, path: Path) -> np.ndarray:
        """(H, W, 3) uint8."""
        return read_rgb(path)

    def _read_label(self, path: Path) -> np.ndarray:
        """(H, W) int64 class ids, -1 ignore."""
        raise NotImplementedError

    def _cache_extra(self) -> str:
        """Anything besides the file list that changes the labels (e.g. a configurable ignore id)."""
        return ""

    # --- setup ----------------------------------------------------------------------------------------------
    @property
    def has_labels(self) -> bool:
        return any(label is not None for _, label in self.samples)

    def _setup(self, samples: list[tuple[str, str | None]]) -> None:
        """Store the relative (image, label) paths; with on_bad='skip' read every sample now and drop bad ones."""
        self.samples = list(samples)
        if self.on_bad == "skip":
            self._drop_bad_samples()

    def _drop_bad_samples(self) -> None:
        good = []
        for sample in tqdm(self.samples, desc=f"checking {self.name}/{self.split}", unit="img"):
            try:
                self._load_arrays_of(sample)
                good.append(sample)
            except BadSampleError as err:
                self.skipped.append(str(err))
        if self.skipped:
            warnings.warn(
                f"{self.name}/{self.split}: skipped {len(self.skipped)} bad sample(s) of {len(self.samples)}, "
                f"first: {self.skipped[0]}",
                stacklevel=3,
            )
        self.samples = good

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    # --- access ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def image_path(self, i: int) -> Path:
        return self.root / self.samples[i][0]

    def _load_arrays_of(self, sample: tuple[str, str | None]) -> tuple[np.ndarray, np.ndarray | None]:
        image = self._read_image(self.root / sample[0])
        if sample[1] is None:
            return image, None
        label = self._read_label(self.root / sample[1])
        if label.shape != image.shape[:2]:
            raise BadSampleError(
                f"Label {self.root / sample[1]} is {label.shape[1]}x{label.shape[0]} but its image "
                f"{self.root / sample[0]} is {image.shape[1]}x{image.shape[0]} (WxH); they must match."
            )
        return image, label

    def load_arrays(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(image (H, W, 3) uint8, label (H, W) int64 or None), at full size."""
        return self._load_arrays_of(self.samples[i])

    def load_raw(self, i: int) -> tuple[Image.Image, np.ndarray | None]:
        """(PIL RGB image, np.int64 label (H, W) with -1 ignore, or None), at full size."""
        image, label = self.load_arrays(i)
        return Image.fromarray(image), label

    def __getitem__(self, i: int) -> dict:
        image, label = self.load_arrays(i)
        image_t, label_t = eval_view(image, label, self.resolution)
        return {"image": image_t, "label": label_t, "index": i}

    @property
    def cache_id(self) -> str:
        """Identifies name, split, crop, resolution and the files (relative names, sizes and modification times,
        never the root).

        A stat per file, not a hash of its bytes: cheap on a million images, and it still catches a label edited
        in place with the same size. Copies made with `cp -p`, `rsync -a` or `shutil.copytree` keep the times,
        so ranks reading their own copy of the data agree.
        """
        if self._cache_id is None:
            digest = hashlib.sha1(self._cache_extra().encode())
            for image, label in sorted(self.samples, key=lambda s: s[0]):
                stats = [(self.root / p).stat() if p else None for p in (image, label)]
                files = [f"{st.st_size}:{st.st_mtime_ns}" if st else "-" for st in stats]
                digest.update(f"{image}|{label}|{'|'.join(files)}\n".encode())
            digest.update(f"view-v{VIEW_VERSION}".encode())
            self._cache_id = f"{self.name}-{self.split}-{self.crop_type}-r{self.resolution}-{digest.hexdigest()[:12]}"
        return self._cache_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, root={self.root})"

