"""`prepare potsdam`: ISPRS Potsdam orthophotos + colour-coded labels -> `potsdam/{imgs,gt}/<tile>.mat` + lists.

Tiles are cut without overlap (partial edge tiles dropped). `img` holds the orthophoto's channels (RGBIR: 4,
RGB: 3) as uint8; `gt` holds ids 0-5 (255 where the colour is none of the six, e.g. eroded boundaries).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image
from tqdm import tqdm

from shared.atomic_io import atomic_write_text
from shared.data.prepare.common import fail, replacing_folders

# ISPRS colour code -> class id: impervious surfaces, building, low vegetation, tree, car, clutter.
COLOURS = {(255, 255, 255): 0, (0, 0, 255): 1, (0, 255, 255): 2, (0, 255, 0): 3, (255, 255, 0): 4, (255, 0, 0): 5}
IMAGE_RE = re.compile(r"top_potsdam_(\d+_\d+)_(RGBIR|RGB)\.(tif|tiff|png)$", re.IGNORECASE)
LABEL_RE = re.compile(r"top_potsdam_(\d+_\d+)_label(_noBoundary)?\.(tif|tiff|png)$", re.IGNORECASE)


def read_array(path: Path) -> np.ndarray:
    """(H, W, C) uint8 from a tif/png; uses tifffile when installed (4-band tifs), else Pillow."""
    try:
        import tifffile  # optional: Pillow cannot read every multi-band GeoTIFF

        if path.suffix.lower() in (".tif", ".tiff"):
            return np.asarray(tifffile.imread(path))
    except ImportError:
        pass
    try:
        with Image.open(path) as im:
            return np.asarray(im)
    except OSError as err:
        fail(f"cannot read {path} ({err}); install tifffile (pip install tifffile) for multi-band GeoTIFFs.")
        raise


def colours_to_ids(rgb: np.ndarray, path: Path) -> np.ndarray:
    """(H, W, 3) ISPRS colours -> (H, W) uint8 ids, 255 for any other colour."""
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        fail(f"label {path} has shape {rgb.shape}; expected an RGB colour-coded image.")
    code = rgb[..., 0].astype(np.int64) << 16 | rgb[..., 1].astype(np.int64) << 8 | rgb[..., 2]
    ids = np.full(code.shape, 255, dtype=np.uint8)
    for (r, g, b), cls in COLOURS.items():
        ids[code == (r << 16 | g << 8 | b)] = cls
    return ids


def find_pairs(src: Path) -> dict[str, tuple[Path, Path | None]]:
    """image id -> (orthophoto, label or None); RGBIR preferred over RGB, noBoundary labels over full ones."""
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for path in sorted(src.rglob("top_potsdam_*")):
        if (m := IMAGE_RE.search(path.name)) and (m.group(2).upper() == "RGBIR" or m.group(1) not in images):
            images[m.group(1)] = path
        elif (m := LABEL_RE.search(path.name)) and (m.group(2) or m.group(1) not in labels):
            labels[m.group(1)] = path
    if not images:
        fail(f"no top_potsdam_<a>_<b>_RGBIR.tif (or _RGB) under {src}; unzip the ISPRS orthophotos there.")
    return {k: (v, labels.get(k)) for k, v in images.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", type=Path, required=True, help="folder with the ISPRS orthophotos and labels")
    parser.add_argument("--dst", type=Path, required=True, help="data root; writes <dst>/potsdam/")
    parser.add_argument("--tile", type=int, default=200, help="tile side in pixels (200 as in IIC/STEGO)")
    parser.add_argument("--test-ids", default="", help="comma-separated image ids for labelled_test, e.g. 2_13,6_9"
                        " (default: every 5th labelled image)")


def cut_image(image_id: str, image_path: Path, label_path: Path | None, imgs: Path, gts: Path, tile: int) -> list[str]:
    """Write the tiles of one orthophoto into the folders `imgs` and `gts`; returns their ids."""
    img = read_array(image_path)
    gt = colours_to_ids(read_array(label_path), label_path) if label_path else None
    if img.ndim != 3 or img.dtype != np.uint8:
        fail(f"{image_path} has shape {img.shape} and dtype {img.dtype}; expected (H, W, 3 or 4) uint8.")
    if gt is not None and gt.shape != img.shape[:2]:
        fail(f"label {label_path} is {gt.shape} but image {image_path} is {img.shape[:2]}; they must match.")
    ids = []
    for r in range(img.shape[0] // tile):
        for c in range(img.shape[1] // tile):
            tile_id = f"{image_id}_{r:03d}_{c:03d}"
            window = np.s_[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile]
            scipy.io.savemat(imgs / f"{tile_id}.mat", {"img": np.ascontiguousarray(img[window])})
            if gt is not None:
                scipy.io.savemat(gts / f"{tile_id}.mat", {"gt": np.ascontiguousarray(gt[window])})
            ids.append(tile_id)
    return ids


def run(args: argparse.Namespace) -> None:
    root = args.dst / "potsdam"
    pairs = find_pairs(args.src)
    labelled = sorted(k for k, (_, label) in pairs.items() if label is not None)
    test_ids = {t.strip() for t in args.test_ids.split(",") if t.strip()} or set(labelled[4::5])
    lists: dict[str, list[str]] = {"labelled_train": [], "labelled_test": [], "unlabelled_train": [], "all": []}
    # The tiles of every list share imgs/ and gt/, so both are replaced whole; the lists are rewritten after them.
    with replacing_folders([root / "imgs", root / "gt"], src=args.src) as building:
        for image_id, (image_path, label_path) in tqdm(sorted(pairs.items()), desc="potsdam", unit="image"):
            tiles = cut_image(image_id, image_path, label_path, building[root / "imgs"], building[root / "gt"],
                              args.tile)
            split = "unlabelled_train" if label_path is None else ("labelled_test" if image_id in test_ids
                                                                   else "labelled_train")
            lists[split] += tiles
            lists["all"] += tiles
    for name, tiles in lists.items():
        atomic_write_text(root / f"{name}.txt", "".join(f"{t}\n" for t in tiles))
        print(f"{name}: {len(tiles)} tiles")
