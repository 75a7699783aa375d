"""SwiGLU feed-forward network of DINOv2 ViT-g/14 (official name: SwiGLUFFNFused)."""

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden_features(in_features: int, mlp_ratio: float) -> int:
    """Hidden width of the fused SwiGLU: 2/3 of the MLP width rounded up to a multiple of 8.

    The 2/3 keeps the parameter count of a plain 4x MLP; for ViT-g (1536, ratio 4) this gives 4096.
    """
    hidden = int(in_features * mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """`w3(silu(a) * b)` with `(a, b)` the two halves of `w12(x)`; keys `w12`, `w3` as in the checkpoints."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(in_features, 2 * hidden_features)
        self.w3 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)
