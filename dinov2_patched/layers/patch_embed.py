"""Image to patch tokens: a strided convolution, one token per non-overlapping patch."""

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Conv `proj` with kernel = stride = patch size; key `patch_embed.proj` as in the checkpoints."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H/p * W/p, C), patches in row-major order."""
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"Input size {height}x{width} is not divisible by the patch size {self.patch_size}; "
                f"crop or resize the images to a multiple of {self.patch_size} first."
            )
        return self.proj(x).flatten(2).transpose(1, 2)
