"""The deterministic views used by the papers: resize the short side (nearest), centre crop, ImageNet normalise."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# Part of every dataset's cache id: bump it when the view changes, so no cache or kNN file of the old view is reused.
VIEW_VERSION = 2  # 2: PIL nearest with torchvision's size rule (1 rounded the long side and indexed in numpy)


def resized_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(new_h, new_w) with the short side `size` and the long side truncated, as torchvision's `Resize(size)`."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def resize_short_side_nearest(array: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W) or (H, W, 3) array so its short side is `size`, nearest neighbour.

    Exactly what the original codebases' `T.Resize(size, Image.NEAREST)` does to a PIL image (torchvision's
    output size, PIL's nearest sampling), so cached features see the pixels the papers' models saw. Image and
    label use this same function, so they stay aligned and labels gain no new values (-1 included).
    """
    new_h, new_w = resized_size(*array.shape[:2], size)
    if array.ndim == 3:
        resized = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).resize((new_w, new_h), Image.NEAREST)
        return np.array(resized)  # a writable copy: PIL's buffer is read-only, which torch warns about
    as_int32 = Image.fromarray(np.ascontiguousarray(array, dtype=np.int32))  # mode "I": any label id, -1 too
    return np.asarray(as_int32.resize((new_w, new_h), Image.NEAREST)).astype(array.dtype)


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
