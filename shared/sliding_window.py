"""Images of any size through a fixed-resolution segmenter: resize, sliding windows, logit averaging, upsampling.

The view (`resized_view`): the short side goes to the segmenter's resolution R (bilinear, antialiased by PIL
when shrinking) and the long side to the nearest multiple of the patch size p, so the resized image is an exact
grid of patches (the aspect ratio changes by under p/2 pixels). Windows of R x R slide over the long side
(`window_starts`) at a stride that is a multiple of p, so the patch tokens of overlapping windows fall on the
same grid cells. The head's outputs are averaged over overlapping windows *at feature resolution*
(`WindowAccumulator`): that is where the windows' cells coincide exactly, and it is R/p times cheaper than
averaging upsampled maps. The averaged maps are then upsampled bilinearly to the original image size, in row
chunks for large images (`upsample_rows`), so a 4000 x 3000 photo never holds (K, 3000, 4000) floats at once.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from shared.data.transforms import normalize_image

DEFAULT_OVERLAP = 1 / 3
ROW_CHUNK = 256  # output rows upsampled at a time, for maps above MAX_FLOATS
MAX_FLOATS = 1 << 25  # 128 MiB of float32: (27, 1100, 1100) still goes in one call


def resized_size(height: int, width: int, resolution: int, patch: int) -> tuple[int, int]:
    """(H', W'): the short side `resolution`, the long side the nearest multiple of `patch` (at least
    `resolution`). `resolution` must be a multiple of `patch`."""
    if resolution % patch:
        raise ValueError(f"resolution {resolution} is not a multiple of the patch size {patch}.")
    short, long = min(height, width), max(height, width)
    long_side = max(resolution, int(round(long * resolution / short / patch)) * patch)
    return (resolution, long_side) if height <= width else (long_side, resolution)


def resized_view(rgb: np.ndarray, resolution: int, patch: int) -> tuple[torch.Tensor, np.ndarray]:
    """uint8 RGB (H, W, 3) -> (ImageNet-normalised (3, H', W') float32, the resized uint8 (H', W', 3))."""
    new_h, new_w = resized_size(rgb.shape[0], rgb.shape[1], resolution, patch)
    if (new_h, new_w) == rgb.shape[:2]:
        resized = np.ascontiguousarray(rgb)
    else:
        resized = np.array(Image.fromarray(rgb).resize((new_w, new_h), Image.BILINEAR))
    return normalize_image(resized), resized


def window_starts(length: int, window: int, patch: int, overlap: float = DEFAULT_OVERLAP) -> list[int]:
    """Start offsets of windows of `window` pixels covering `length` pixels (both multiples of `patch`).

    The stride is the largest multiple of `patch` not above window * (1 - overlap) (at least one patch); the
    last window ends exactly at `length`. One window when length == window.
    """
    if length < window or length % patch or window % patch:
        raise ValueError(f"cannot tile {length} px with {window} px windows on a {patch} px patch grid.")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}.")
    stride = max(patch, int(window * (1.0 - overlap)) // patch * patch)
    n = 1 + math.ceil((length - window) / stride)
    starts = [min(i * stride, length - window) for i in range(n)]
    return sorted(set(starts))


def windows(height: int, width: int, resolution: int, patch: int, overlap: float = DEFAULT_OVERLAP
            ) -> list[tuple[int, int]]:
    """(top, left) pixel offsets of every R x R window of a resized (H', W') image."""
    return [(top, left) for top in window_starts(height, resolution, patch, overlap)
            for left in window_starts(width, resolution, patch, overlap)]


class WindowAccumulator:
    """Sums a head's per-window outputs on the image's feature grid and counts the windows per cell.

    keys: the outputs to average (e.g. "cluster_logits", "variance"); grid: (h, w) = (H'/p, W'/p).
    """

    def __init__(self, keys: tuple[str, ...], grid: tuple[int, int], patch: int) -> None:
        self.keys, self.grid, self.patch = keys, grid, patch
        self.sums: dict[str, torch.Tensor] = {}
        self.counts = torch.zeros(grid, dtype=torch.float32)

    def add(self, outputs: dict[str, torch.Tensor], top: int, left: int) -> None:
        """outputs: one window's {key: (C, r, r) or (r, r)} at feature resolution; top/left in pixels."""
        y, x = top // self.patch, left // self.patch
        for key in self.keys:
            value = outputs[key].float().cpu()
            value = value[None] if value.dim() == 2 else value  # variance (r, r) -> (1, r, r)
            if key not in self.sums:
                self.sums[key] = torch.zeros(value.shape[0], *self.grid, dtype=torch.float32)
            self.sums[key][:, y: y + value.shape[1], x: x + value.shape[2]] += value
        r = outputs[self.keys[0]].shape[-1]
        self.counts[y: y + r, x: x + r] += 1

    def mean(self, key: str) -> torch.Tensor:
        """(C, h, w) average over the windows covering each cell (every cell is covered at least once)."""
        return self.sums[key] / self.counts.clamp_min(1)


def _linear_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index0, index1, weight1) of 1-D linear interpolation from n_in to n_out samples, with the rule of
    `F.interpolate(mode="bilinear", align_corners=False)`: source = (dst + 0.5) * n_in / n_out - 0.5, >= 0."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0.0)
    index0 = src.floor().long().clamp_max(n_in - 1)
    index1 = (index0 + 1).clamp_max(n_in - 1)
    return index0, index1, (src - index0).float()


def upsample_rows(values: torch.Tensor, size: tuple[int, int], reduce=None, chunk: int = ROW_CHUNK,
                  max_floats: int = MAX_FLOATS):
    """Bilinear upsampling of (C, h, w) to (C, H, W), as `F.interpolate(align_corners=False)`.

    With `reduce` (a function of a (C, rows, W) block, e.g. the argmax over C), returns its result for the whole
    map instead. Maps of more than `max_floats` values are upsampled `chunk` output rows at a time (the reduction
    applied per block and the blocks concatenated along their first axis), so only (C, chunk, W) floats exist at
    once; smaller ones in one `F.interpolate` call, which is several times faster.
    """
    height, width = size
    if values.shape[0] * height * width <= max_floats:
        full = F.interpolate(values[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        return full if reduce is None else reduce(full)
    wide = F.interpolate(values[None].float(), size=(values.shape[1], width), mode="bilinear",
                         align_corners=False)[0]  # (C, h, W): the width pass, exact
    index0, index1, weight1 = _linear_taps(values.shape[1], height)
    parts = []
    for start in range(0, height, chunk):
        rows = slice(start, min(start + chunk, height))
        block = torch.lerp(wide[:, index0[rows]], wide[:, index1[rows]], weight1[rows].view(1, -1, 1))
        parts.append(block if reduce is None else reduce(block))  # block: (C, rows, W)
    return torch.cat(parts, dim=1 if reduce is None else 0)


def argmax_channels(block: torch.Tensor) -> torch.Tensor:
    """(C, H, W) -> (H, W) int64 index of the largest channel (`max(0)`: several times faster than `argmax(0)`
    on a CPU for this layout)."""
    return block.max(dim=0).indices
