"""Fixed per-dataset palettes, label colouring, overlays, uncertainty maps and PNG panel grids.

The palette is fixed per dataset so that the same class has the same colour in every panel and every figure;
ignored pixels (-1) are black. Predictions from cluster heads should be mapped to classes first
(:func:`clusters_to_classes` with the Hungarian mapping) so that they share the ground truth's colours.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw

from shared.atomic_io import atomic_open
from shared.data.transforms import denormalize_image

# Official Cityscapes colours (cityscapesScripts labels.py) for the 27 classes, in label order id - 7.
CITYSCAPES27 = [
    (128, 64, 128), (244, 35, 232), (250, 170, 160), (230, 150, 140), (70, 70, 70), (102, 102, 156),
    (190, 153, 153), (180, 165, 180), (150, 100, 100), (150, 120, 90), (153, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 0, 90), (0, 0, 110), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]
# Standard CamVid (SegNet 11-class) colours: sky, building, pole, road, pavement, tree, sign/symbol, fence, car,
# pedestrian, bicyclist.
CAMVID = [
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0), (192, 128, 128),
    (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
]
# ISPRS Potsdam colours: impervious surfaces, building, low vegetation, tree, car, clutter.
POTSDAM6 = [(255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0)]
# Potsdam-3 (roads and cars, buildings and clutter, vegetation and trees): the ISPRS colour of the main member.
POTSDAM3 = [(255, 255, 255), (0, 0, 255), (0, 255, 0)]


def pascal_palette(n: int) -> list[tuple[int, int, int]]:
    """The PASCAL VOC bit-interleaved colour map (used by STEGO for COCO-Stuff), skipping its black entry 0
    so that black stays reserved for ignored pixels."""
    colours = []
    for index in range(1, n + 1):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append((r, g, b))
    return colours


def default_palette(n: int) -> list[tuple[int, int, int]]:
    """Distinct colours for any n: golden-ratio hue steps at two brightness levels."""
    out = []
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        v = 0.95 if i % 2 == 0 else 0.7
        out.append(tuple(int(round(255 * x)) for x in colorsys.hsv_to_rgb(h, 0.75, v)))
    return out


PALETTES = {
    "cocostuff27": pascal_palette(27), "cityscapes27": CITYSCAPES27, "potsdam3": POTSDAM3,
    "potsdam6": POTSDAM6, "camvid": CAMVID, "camvid_sample": CAMVID,
}


def palette_for(dataset: str, n_colors: int | None = None) -> np.ndarray:
    """uint8 palette (n, 3) for ``dataset`` (unknown names get :func:`default_palette`); ``n_colors`` beyond the
    dataset's classes (e.g. unmatched clusters) are appended from the default palette."""
    base = list(PALETTES.get(dataset, default_palette(n_colors or 27)))
    if n_colors is not None and n_colors > len(base):
        base += default_palette(n_colors)[len(base):]
    return np.array(base[: n_colors or len(base)], dtype=np.uint8)


def clusters_to_classes(pred: np.ndarray | torch.Tensor, mapping: Sequence[int]) -> np.ndarray:
    """Cluster ids (H, W) -> class ids via a cluster -> class mapping (-1 for unmatched clusters)."""
    return np.asarray(mapping, dtype=np.int64)[np.asarray(pred, dtype=np.int64)]


def colorize(label_map: np.ndarray | torch.Tensor, palette: np.ndarray) -> np.ndarray:
    """Label map (H, W) int -> uint8 RGB (H, W, 3); negative labels (ignore / unmatched) are black."""
    labels = np.asarray(label_map.cpu() if torch.is_tensor(label_map) else label_map).astype(np.int64)
    if labels.size and labels.max() >= len(palette):
        raise ValueError(f"Label {labels.max()} has no colour in a palette of {len(palette)}; "
                         "ask palette_for(..., n_colors=...) for more.")
    out = np.zeros((*labels.shape, 3), dtype=np.uint8)
    valid = labels >= 0
    out[valid] = palette[labels[valid]]
    return out


def to_uint8_image(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """ImageNet-normalised (3, H, W) tensor, or a uint8 (H, W, 3) array -> uint8 RGB (H, W, 3)."""
    if torch.is_tensor(image):
        return denormalize_image(image)
    return np.asarray(image, dtype=np.uint8)


def overlay(image: np.ndarray | torch.Tensor, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colour map (H, W, 3) onto an image (see :func:`to_uint8_image`); returns uint8 (H, W, 3)."""
    rgb = to_uint8_image(image).astype(np.float32)
    if rgb.shape != colours.shape:
        raise ValueError(f"Image {rgb.shape} and colour map {colours.shape} differ in size.")
    return ((1 - alpha) * rgb + alpha * colours.astype(np.float32)).round().astype(np.uint8)


def uncertainty_colormap(values: np.ndarray | torch.Tensor, vmin: float | None = None, vmax: float | None = None,
                         cmap: str = "magma") -> np.ndarray:
    """Scalar map (H, W) -> uint8 RGB (H, W, 3) with a perceptual colour map; NaN -> black.
    The range defaults to the map's finite min / max."""
    v = np.asarray(values.detach().cpu() if torch.is_tensor(values) else values, dtype=np.float64)
    finite = np.isfinite(v)
    lo = float(v[finite].min()) if vmin is None and finite.any() else (vmin or 0.0)
    hi = float(v[finite].max()) if vmax is None and finite.any() else (vmax if vmax is not None else 1.0)
    scaled = np.clip((v - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    rgb = (colormaps[cmap](np.where(finite, scaled, 0.0))[..., :3] * 255).round().astype(np.uint8)
    rgb[~finite] = 0
    return rgb


def grid_size(n_rows: int, n_cols: int, cell: tuple[int, int], titled: bool, pad: int = 4,
              title_h: int = 14) -> tuple[int, int]:
    """(width, height) in pixels of :func:`save_grid` output for cells of (height, width) ``cell``."""
    cell_h, cell_w = cell
    return n_cols * cell_w + (n_cols + 1) * pad, n_rows * (cell_h + (title_h if titled else 0)) + (n_rows + 1) * pad


def save_grid(rows: Sequence[Sequence[np.ndarray | None]], path: str | os.PathLike,
              titles: Sequence[str] | Sequence[Sequence[str]] | None = None, pad: int = 4,
              title_h: int = 14) -> tuple[int, int]:
    """Write a PNG grid of uint8 panels ((H, W, 3) or (H, W)) atomically; ``None`` leaves a cell blank.

    Cells take the largest panel size; smaller panels are scaled with nearest neighbour (label maps stay crisp).
    ``titles`` is one list for the columns (drawn above every row) or one list per row. Returns (width, height).
    """
    panels = [p for row in rows for p in row if p is not None]
    if not panels:
        raise ValueError(f"save_grid({path}) got no panels to draw.")
    cell = (max(p.shape[0] for p in panels), max(p.shape[1] for p in panels))
    n_cols = max(len(row) for row in rows)
    titled = titles is not None
    width, height = grid_size(len(rows), n_cols, cell, titled, pad, title_h)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        top = pad + r * (cell[0] + (title_h if titled else 0) + pad)
        row_titles = (titles[r] if titles and not isinstance(titles[0], str) else titles) or []
        for c, panel in enumerate(row):
            left = pad + c * (cell[1] + pad)
            if c < len(row_titles):
                draw.text((left, top), str(row_titles[c]), fill=(0, 0, 0))
            if panel is None:
                continue
            img = Image.fromarray(np.asarray(panel, dtype=np.uint8)).convert("RGB")
            if img.size != (cell[1], cell[0]):
                img = img.resize((cell[1], cell[0]), Image.NEAREST)
            canvas.paste(img, (left, top + (title_h if titled else 0)))
    with atomic_open(path, "wb") as f:
        canvas.save(f, format="PNG")
    return width, height
