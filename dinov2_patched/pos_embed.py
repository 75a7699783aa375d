"""Resizing the learned position embeddings to the patch grid of the input.

Two rules, both bicubic and both computed in float32, as the official implementations do:
- "offset" (DINOv2 without registers, DINO v1): `scale_factor = ((h + 0.1) / M, (w + 0.1) / M)` with no
  antialiasing. The +0.1 is the historical fix for the floor in the output size; because the scale factor
  (not the size) is passed, it also sets the sampling positions, so it must be kept to match the checkpoints.
- "size_antialias" (DINOv2 with registers): the output size (h, w) directly, with antialiasing.
Nothing is resized when the grid already is the trained M x M one.
"""

import torch
import torch.nn.functional as F

POS_INTERPOLATIONS = ("offset", "size_antialias")
_OFFSET = 0.1


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int, rule: str) -> torch.Tensor:
    """(1, 1 + M*M, C) trained embeddings -> (1, 1 + grid_h*grid_w, C), class position kept as is.

    Returns `pos_embed` itself when (grid_h, grid_w) == (M, M); otherwise a float32 result cast back to
    the dtype of `pos_embed`.
    """
    n_trained = pos_embed.shape[1] - 1
    side = int(round(n_trained**0.5))
    if side * side != n_trained:
        raise ValueError(f"pos_embed holds {n_trained} patch positions, which is not a square grid.")
    if grid_h == side and grid_w == side:
        return pos_embed
    if rule not in POS_INTERPOLATIONS:
        raise ValueError(f"Unknown position interpolation {rule!r}; expected one of {POS_INTERPOLATIONS}.")
    dim = pos_embed.shape[-1]
    class_pos = pos_embed[:, :1].float()  # (1, 1, C)
    grid = pos_embed[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, C, M, M)
    if rule == "offset":
        scale = ((grid_h + _OFFSET) / side, (grid_w + _OFFSET) / side)
        resized = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
    else:
        resized = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", antialias=True)
    if resized.shape[-2:] != (grid_h, grid_w):
        raise RuntimeError(f"Position grid resized to {tuple(resized.shape[-2:])} instead of {(grid_h, grid_w)}.")
    patch_pos = resized.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
    return torch.cat((class_pos, patch_pos), dim=1).to(pos_embed.dtype)
