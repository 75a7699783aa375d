"""`comparison.png`: one row per image with the columns image, ground truth, each method's prediction (clusters
Hungarian-matched to classes and coloured with the dataset's fixed palette, so a class has the same colour in
every panel) and the uncertainty map of each method that has one.

Every panel is resized to `panel` x `panel` pixels and drawn by `shared.viz.save_grid` with the column titles
above each row; the figure's size is `figure_size(rows, columns, panel)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def figure_size(rows: int, columns: int, panel: int) -> tuple[int, int]:
    """(width, height) in pixels of a figure with this many rows and columns of square `panel` panels."""
    from shared.viz import grid_size

    return grid_size(rows, columns, (panel, panel), titled=True)


def _resize(array: np.ndarray, panel: int, nearest: bool) -> np.ndarray:
    """(H, W, 3) uint8 -> (panel, panel, 3); label maps use nearest so class borders stay crisp."""
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(array).resize((panel, panel), resample))


def method_columns(results: Sequence) -> list[tuple[str, str, np.ndarray]]:
    """(title, kind, (F, R, R) arrays) per column: each successful method's prediction, then its uncertainty."""
    columns = []
    for result in results:
        if result.status != "ok" or result.predictions is None:
            continue
        columns.append((result.method, "labels", result.predictions))
        if result.uncertainty is not None:
            columns.append((f"{result.method} uncertainty", "uncertainty", result.uncertainty))
    return columns


def figure_rows(images: Sequence, ground_truth: Sequence[np.ndarray], columns: Sequence[tuple],
                palette: np.ndarray, panel: int) -> list[list[np.ndarray]]:
    """Panels per row. images: ImageNet-normalised (3, R, R) tensors; ground_truth: (R, R) class ids (-1 ignore);
    uncertainty maps are drawn on the fixed range [0, 1] so panels are comparable across methods."""
    from shared.viz import colorize, to_uint8_image, uncertainty_colormap

    rows = []
    for r, (image, truth) in enumerate(zip(images, ground_truth, strict=True)):
        row = [_resize(to_uint8_image(image), panel, nearest=False),
               _resize(colorize(truth, palette), panel, nearest=True)]
        for _, kind, arrays in columns:
            if kind == "labels":
                row.append(_resize(colorize(arrays[r], palette), panel, nearest=True))
            else:
                row.append(_resize(uncertainty_colormap(arrays[r], vmin=0.0, vmax=1.0), panel, nearest=False))
        rows.append(row)
    return rows


def save_comparison_figure(path: str | Path, dataset, labels: np.ndarray, figure_indices: Sequence[int],
                           results: Sequence, panel: int = 160) -> Path:
    """Write `comparison.png` atomically. labels: (N, R, R) cached ground truth; dataset[i]["image"] the image."""
    from shared.viz import palette_for, save_grid

    palette = palette_for(dataset.name, dataset.n_classes)
    columns = method_columns(results)
    images = [dataset[int(i)]["image"] for i in figure_indices]
    truth = [np.asarray(labels[int(i)], dtype=np.int64) for i in figure_indices]
    rows = figure_rows(images, truth, columns, palette, panel)
    # The default font is about 6 pixels per character: longer titles would run into the next panel.
    titles = [t[: max(6, panel // 6)] for t in ["image", "ground truth", *[title for title, _, _ in columns]]]
    save_grid(rows, path, titles=titles)  # atomic
    return Path(path)


def figure_indices_for(n_images: int, rows: int) -> list[int]:
    """`rows` image indices spread evenly over the split (all of them when the split is smaller)."""
    if n_images <= rows:
        return list(range(n_images))
    return [int(round(i * (n_images - 1) / (rows - 1))) for i in range(rows)] if rows > 1 else [0]
