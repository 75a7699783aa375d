"""The deterministic views used by the papers: resize the short side (nearest), centre crop, ImageNet normalise."""

from __future__ import annotations

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index for each output index of a nearest-neighbour resize (pixel-centre aligned), shape (n_out,)."""
    idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
    return np.clip(idx, 0, n_in - 1)


def resize_short_side_nearest(array: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W) or (H, W, C) array so its short side is `size`, nearest neighbour.

    Image and label use this same function so that they stay pixel aligned and labels gain no new values.
    """
    h, w = array.shape[:2]
    if h <= w:
        new_h, new_w = size, max(size, int(round(w * size / h)))
    else:
        new_h, new_w = max(size, int(round(h * size / w))), size
    rows = nearest_indices(h, new_h)
    cols = nearest_indices(w, new_w)
    return array[rows][:, cols]


def center_crop(array: np.ndarray, size: int) -> np.ndarray:
    """Centre crop an (H, W, ...) array with H, W >= size to (size, size, ...)."""
    h, w = array.shape[:2]
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return array[top : top + size, left : left + size]


def normalize_image(image_hwc_uint8: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 tensor, ImageNet mean/std normalised."""
    x = torch.from_numpy(np.ascontiguousarray(image_hwc_uint8)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def denormalize_image(image: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised (3, H, W) tensor -> uint8 RGB (H, W, 3), the inverse of :func:`normalize_image`.

    Rounds to the nearest grey level, so a uint8 image survives normalise -> denormalise exactly.
    """
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (image.detach().float().cpu() * std + mean).clamp(0.0, 1.0).mul(255).round().to(torch.uint8)
    return rgb.permute(1, 2, 0).numpy()


def eval_view(image_hwc_uint8: np.ndarray, label: np.ndarray | None, resolution: int):
    """The centre view: short side -> `resolution` (nearest), centre crop `resolution`.

    Returns (image (3, R, R) float32 normalised, label (R, R) int64 with -1 ignore; all -1 when `label` is None).
    """
    image = center_crop(resize_short_side_nearest(image_hwc_uint8, resolution), resolution)
    if label is None:
        target = torch.full((resolution, resolution), -1, dtype=torch.long)
    else:
        target = torch.from_numpy(
            np.ascontiguousarray(center_crop(resize_short_side_nearest(label, resolution), resolution))
        ).long()
    return normalize_image(image), target
