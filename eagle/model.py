"""EAGLE's modules (no I/O, no distributed calls): the segmentation head, the projection for the object-centric
loss, the eigen cluster probe that turns EiCue eigenvectors into segments, and the exported evaluation head.

The head is STEGO's two-branch 1x1-conv head on the concatenated keys of the last three blocks:

    code = Conv1x1(C->D)(drop(f)) + Conv1x1(C->D)(ReLU(Conv1x1(C->C)(drop(f))))     (D = 512)

with an independent Dropout2d sample in each branch and a third for the features the losses read, as in the
original `DinoFeaturizer`. At evaluation dropout is the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EagleHead(nn.Module):
    """Two-branch head: feats (B, C, h, w) -> (signal = drop(feats) (B, C, h, w), code (B, D, h, w))."""

    def __init__(self, in_dim: int, code_dim: int = 512, dropout: float = 0.1, nonlinear: bool = True) -> None:
        super().__init__()
        self.in_dim, self.code_dim = in_dim, code_dim
        self.dropout = nn.Dropout2d(p=dropout)  # stateless: each call draws a fresh channel mask
        self.linear_branch = nn.Conv2d(in_dim, code_dim, kernel_size=1)
        self.nonlinear_branch = nn.Sequential(
            nn.Conv2d(in_dim, in_dim, kernel_size=1), nn.ReLU(), nn.Conv2d(in_dim, code_dim, kernel_size=1),
        ) if nonlinear else None

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = feats.contiguous(memory_format=torch.channels_last)  # faster oneDNN 1x1 convs on CPU (layout only)
        code = self.linear_branch(self.dropout(feats))
        if self.nonlinear_branch is not None:
            code = code + self.nonlinear_branch(self.dropout(feats))
        return self.dropout(feats), code


class Projection(nn.Module):
    """Linear(D, D) then L2 normalisation, applied token-wise: (T, D) -> (T, D) unit rows."""

    def __init__(self, code_dim: int = 512) -> None:
        super().__init__()
        self.linear = nn.Linear(code_dim, code_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(tokens), dim=-1)


class EigenClusterProbe(nn.Module):
    """Centres for the EiCue embedding (the K − 1 non-trivial eigenvectors of each token).

    ``inner = <normalize(x), normalize(centre)>``; the loss is the original's *soft* cosine k-means with α = 1,
    ``-(softmax(α·inner) · inner).sum(centres).mean()``, and the output is ``log_softmax(α·inner)``.
    """

    def __init__(self, dim: int = 3, n_centres: int = 32) -> None:
        super().__init__()
        self.centres = nn.Parameter(torch.randn(n_centres, dim))

    def forward(self, x: torch.Tensor, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, dim, h, w) -> (loss scalar, log-probabilities (B, n_centres, h, w))."""
        inner = torch.einsum("bchw,nc->bnhw", F.normalize(x, dim=1), F.normalize(self.centres, dim=1))
        loss = -(torch.softmax(alpha * inner, dim=1) * inner).sum(dim=1).mean()
        return loss, torch.log_softmax(alpha * inner, dim=1)


class EagleEvalHead(nn.Module):
    """The exported head: features -> {code, cluster_logits (α = 4 by default), linear_logits} (dropout off).

    Holds the trained head and the probes (shared, not copied), so it always reflects the current weights. The
    projection and the eigen probes are training-time parts and are not exported.
    """

    def __init__(self, head: EagleHead, cluster_probe: nn.Module, linear_probe: nn.Module, alpha: float) -> None:
        super().__init__()
        self.head, self.cluster_probe, self.linear_probe = head, cluster_probe, linear_probe
        self.alpha = float(alpha)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        _, code = self.head(features)  # (B, D, h, w)
        _, cluster_logits = self.cluster_probe(code, self.alpha)  # (B, K', h, w)
        return {"code": code, "cluster_logits": cluster_logits, "linear_logits": self.linear_probe(code)}
