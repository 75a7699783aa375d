"""Per-channel residual branch scaling (LayerScale) used by DINOv2."""

import torch
from torch import nn


class LayerScale(nn.Module):
    """Multiplies (B, T, C) by a learned (C,) vector `gamma` (checkpoint key `ls1.gamma` / `ls2.gamma`)."""

    def __init__(self, dim: int, init_value: float = 1.0) -> None:
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        return x * self.gamma

    def add_to(self, residual: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """`residual + gamma * branch` in one pass over memory (the two-op form costs a second full pass)."""
        return torch.addcmul(residual, branch, self.gamma)
