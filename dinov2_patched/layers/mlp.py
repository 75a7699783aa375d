"""Two-layer feed-forward network with exact (erf) GELU, as in DINO and DINOv2 S/B/L."""

import torch
from torch import nn


class Mlp(nn.Module):
    """`fc2(gelu(fc1(x)))`; parameter names `fc1`, `fc2` match the official checkpoints."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()  # approximate="none": the checkpoints were trained with the erf form
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        return self.fc2(self.act(self.fc1(x)))
