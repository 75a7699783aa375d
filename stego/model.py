"""STEGO segmentation head (modules only: no I/O, no distributed calls).

The head maps frozen backbone features to a low-dimensional code:

    code = Conv1x1(C->D)(drop(f)) + Conv1x1(C->D)(ReLU(Conv1x1(C->C)(drop(f))))

with an independent Dropout2d sample in each branch, as in the original `DinoFeaturizer`.
The correspondence loss reads the features through a third, independent dropout sample.
At evaluation time dropout is the identity, so the exported head is two plain conv1x1 branches.
"""

from __future__ import annotations

import torch
from torch import nn


class StegoHead(nn.Module):
    """Two-branch 1x1-conv projection head.

    Args:
        in_dim: backbone feature channels C.
        code_dim: code channels D (70 in the paper; 100 for DINOv2 ViT-B).
        dropout: Dropout2d probability applied to the features of each branch (0.1).
        nonlinear: add the ReLU branch (the paper's "nonlinear" projection); False keeps only the linear branch.
    """

    def __init__(self, in_dim: int, code_dim: int, dropout: float = 0.1, nonlinear: bool = True) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.code_dim = code_dim
        self.dropout = nn.Dropout2d(p=dropout)  # stateless: each call draws a fresh channel mask
        self.linear_branch = nn.Conv2d(in_dim, code_dim, kernel_size=1)
        self.nonlinear_branch = (
            nn.Sequential(
                nn.Conv2d(in_dim, in_dim, kernel_size=1),
                nn.ReLU(),
                nn.Conv2d(in_dim, code_dim, kernel_size=1),
            )
            if nonlinear
            else None
        )

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (B, C, h, w) -> (signal (B, C, h, w), code (B, D, h, w)).

        `signal` is drop(feats), the feature side of the correspondence loss.
        """
        # Channels-last makes oneDNN's 1x1 convolutions about twice as fast on CPU (a layout change only).
        feats = feats.contiguous(memory_format=torch.channels_last)
        code = self.linear_branch(self.dropout(feats))  # (B, D, h, w)
        if self.nonlinear_branch is not None:
            code = code + self.nonlinear_branch(self.dropout(feats))
        return self.dropout(feats), code


class StegoEvalHead(nn.Module):
    """The exported evaluation head: features -> {code, cluster_logits, linear_logits} (dropout off).

    Holds the trained head and both probes (shared, not copied), so it always reflects the current weights.
    """

    def __init__(self, head: StegoHead, cluster_probe: nn.Module, linear_probe: nn.Module, alpha: float) -> None:
        super().__init__()
        self.head, self.cluster_probe, self.linear_probe = head, cluster_probe, linear_probe
        self.alpha = float(alpha)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        _, code = self.head(features)  # (B, D, h, w)
        _, cluster_logits = self.cluster_probe(code, self.alpha)  # (B, K', h, w)
        return {"code": code, "cluster_logits": cluster_logits, "linear_logits": self.linear_probe(code)}
