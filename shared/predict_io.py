"""Files of `shared.predict`: finding and reading the user's images, the mapping file, the output PNGs and
index.csv. No models here."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from shared.atomic_io import atomic_path, atomic_write_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
INDEX_FIELDS = ("file", "width", "height", "seconds", "mean_variance", "status", "error")
UNMATCHED_ID = 255  # the labels PNG's value for a cluster the mapping sends to no class


def segmenter_file(value: str) -> Path:
    """A run directory (its export/segmenter.pt2) or a segmenter file."""
    from shared.run_dir import EXPORT_RELATIVE

    path = Path(value).expanduser()
    return path / EXPORT_RELATIVE if path.is_dir() else path


def list_images(images: str, out: Path) -> list[tuple[Path, str]]:
    """(path, name) of every image under `images` (a folder, searched recursively, or one file), sorted; `name`
    is the relative path without its suffix (with it where two images would share a name). Files under `out`
    and hidden files are left out. ValueError when there is none."""
    root = Path(images).expanduser()
    if root.is_file():
        return [(root, root.stem)]
    if not root.is_dir():
        raise ValueError(f"--images {images}: no such file or folder; pass a folder of images or one image.")
    out = out.resolve()
    found = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts)
                   and out not in p.resolve().parents)
    if not found:
        raise ValueError(f"--images {images} holds no images ({', '.join(IMAGE_SUFFIXES)}); pass a folder of images.")
    stems = [str(p.relative_to(root).with_suffix("")) for p in found]
    return [(p, stem if stems.count(stem) == 1 else str(p.relative_to(root)))
            for p, stem in zip(found, stems, strict=True)]


def read_image(path: Path) -> np.ndarray:
    """Any image file -> uint8 RGB (H, W, 3), EXIF orientation applied (alpha dropped, grayscale replicated)."""
    with Image.open(path) as image:
        image.load()
        return np.array(ImageOps.exif_transpose(image).convert("RGB"))


def load_mapping(path: str, metadata: dict, segmenter_path: Path) -> np.ndarray:
    """The cluster -> class mapping of this segmenter from a compare `results.json` (`make eval` writes one in
    <run>/eval/), after checking its dataset and class count match the segmenter's."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        header, results = data["header"], data["results"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"--mapping {path} is not a results.json written by compare (make compare / make eval); "
                         "pass one of those.") from None
    if header.get("dataset") != metadata["dataset"] or int(header.get("n_classes", -1)) != metadata["n_classes"]:
        raise ValueError(f"--mapping {path} is for dataset {header.get('dataset')!r} ({header.get('n_classes')} "
                         f"classes) but the segmenter was trained on {metadata['dataset']!r} "
                         f"({metadata['n_classes']} classes); pass the results.json of a comparison on its dataset.")
    target = segmenter_path.resolve()
    for result in results:
        if segmenter_file(str(result.get("path", ""))).resolve() == target and result.get("unsupervised"):
            mapping = np.asarray(result["unsupervised"]["mapping"], dtype=np.int64)
            if mapping.shape != (metadata["n_clusters"],):
                break
            return mapping
    raise ValueError(f"--mapping {path} has no scored row for {segmenter_path} (its rows: "
                     f"{[r.get('path') for r in results]}); run `make eval RUN=<this run>` and pass its results.json.")


def output_paths(out: Path, name: str, variance: bool) -> dict[str, Path]:
    paths = {"labels": out / "labels" / f"{name}.png", "overlay": out / "overlay" / f"{name}.png"}
    if variance:
        paths["variance"] = out / "variance" / f"{name}.png"
    return paths


def write_png(path: Path, array: np.ndarray, durable: bool = True) -> None:
    """Atomic PNG: uint8 (H, W) or (H, W, 3), or uint16 (H, W) ids; compression level 1 (speed over size).
    `durable=False` skips the fsyncs (about as long as the encoding): for outputs written before the labels PNG,
    whose fsynced presence marks an image as done."""
    with atomic_path(path, suffix=".tmp.png", durable=durable) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=1)


def label_image(ids: torch.Tensor, mapping: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Cluster ids (H, W) -> (ids for colouring, -1 = unmatched; ids as stored in the labels PNG)."""
    ids = ids.numpy().astype(np.int64)
    if mapping is not None:
        ids = mapping[ids]
    stored = np.where(ids < 0, UNMATCHED_ID, ids)
    return ids, stored.astype(np.uint8 if stored.max(initial=0) <= 255 else np.uint16)


def write_index(out: Path, rows: dict[str, dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=INDEX_FIELDS, lineterminator="\n")
    writer.writeheader()
    for file in sorted(rows):
        writer.writerow(rows[file])
    atomic_write_text(out / "index.csv", buffer.getvalue())


def read_index(out: Path) -> dict[str, dict]:
    """The rows of a previous run's index.csv (empty when there is none or it is unreadable)."""
    try:
        with (out / "index.csv").open(encoding="utf-8", newline="") as f:
            return {row["file"]: row for row in csv.DictReader(f) if row.get("file")}
    except (OSError, csv.Error, KeyError):
        return {}


def failed_row(file: str, error: BaseException) -> dict:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return {"file": file, "width": "", "height": "", "seconds": "", "mean_variance": "", "status": "failed",
            "error": f"{type(error).__name__}: {message}"}
