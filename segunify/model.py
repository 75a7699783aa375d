"""SegUnify modules (no I/O, no distributed calls): the compressor, the labeler and the exported head.

Compressor (frozen features X (B, C, h, w) -> code F (B, D, h, w)):

    linear branch     SiLU(BN(Conv1x1_{C->D}(X)))
    nonlinear branch  SiLU(BN(Conv1x1_{C->D}(SiLU(BN(Conv1x1_{C->C}(X))))))    (optional)
    F = linear + nonlinear

Labeler: `n_sets` sets of K local centres (parameters, Xavier-normal initialisation, learned by gradient) and one
set of K global centres (a buffer), moved after every optimiser step by C_global <- a C_global + (1 - a) C_local
(the mean of the local sets when there are several). `start_at` points them along data directions before the
first step (see `segunify.centres`; `centre_init: xavier` keeps the slides' random directions). The exported head
scores the code against the *global* centres, whose identities the agreement loss keeps stable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_silu(in_dim: int, out_dim: int) -> nn.Sequential:
    """Conv1x1 -> BatchNorm2d -> SiLU. The convolution has no bias: the batch norm's shift replaces it."""
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, kernel_size=1, bias=False), nn.BatchNorm2d(out_dim), nn.SiLU())


class Compressor(nn.Module):
    """Dimensionality reduction C -> D; deterministic in eval mode (batch norm reads its running statistics)."""

    def __init__(self, in_dim: int, code_dim: int, nonlinear: bool = True) -> None:
        super().__init__()
        self.in_dim, self.code_dim = in_dim, code_dim
        self.linear_branch = conv_bn_silu(in_dim, code_dim)
        self.nonlinear_branch = (nn.Sequential(conv_bn_silu(in_dim, in_dim), conv_bn_silu(in_dim, code_dim))
                                 if nonlinear else None)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, C, h, w) -> code (B, D, h, w)."""
        code = self.linear_branch(features)
        if self.nonlinear_branch is not None:
            code = code + self.nonlinear_branch(features)
        return code


def cosine_scores(code: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Cosine of every token to every centre: code (B, D, h, w), centres (K, D) -> (B, K, h, w)."""
    return torch.einsum("bdhw,kd->bkhw", F.normalize(code, dim=1), F.normalize(centres, dim=1))


class Labeler(nn.Module):
    """Local centres (n_sets, K, D) learned by gradient; global centres (K, D) moved by EMA, never by gradient."""

    def __init__(self, code_dim: int, n_clusters: int, n_sets: int = 1, ema: float = 0.99) -> None:
        super().__init__()
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema={ema} must be in [0, 1): it is the weight kept by the global centres per step.")
        self.ema = float(ema)
        local = torch.empty(n_sets, n_clusters, code_dim)
        for centres in local:
            nn.init.xavier_normal_(centres)
        self.local = nn.Parameter(local)
        # The global centres start where the local ones do, so the first targets are the local set's own argmax.
        self.register_buffer("global_centres", local.mean(0).clone())

    @property
    def n_clusters(self) -> int:
        return self.local.shape[1]

    def local_scores(self, code: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (n_sets, B, K, h, w) cosines to each local set."""
        return torch.stack([cosine_scores(code, centres) for centres in self.local])

    def global_scores(self, code: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, K, h, w) cosines to the global centres."""
        return cosine_scores(code, self.global_centres)

    @torch.no_grad()
    def start_at(self, directions: torch.Tensor) -> None:
        """Point every local set and the global centres along `directions` (K, D), keeping the local centres'
        lengths (from the Xavier-normal draw); the global centres are their mean, as at construction."""
        lengths = self.local.norm(dim=-1, keepdim=True)  # (n_sets, K, 1)
        self.local.copy_(F.normalize(directions.to(self.local), dim=1)[None] * lengths)
        self.global_centres.copy_(self.local.mean(0))

    @torch.no_grad()
    def update_global(self) -> None:
        """C_global <- ema * C_global + (1 - ema) * mean over sets of C_local (call after the optimiser step)."""
        self.global_centres.mul_(self.ema).add_(self.local.detach().mean(0), alpha=1.0 - self.ema)


class SegUnifyEvalHead(nn.Module):
    """The exported head: features -> {code, cluster_logits = alpha * cos(code, global), linear_logits?}.

    Holds the trained modules (shared, not copied); call `.eval()` so batch norm reads its running statistics.
    """

    def __init__(self, compressor: Compressor, labeler: Labeler, linear_probe: nn.Module | None,
                 alpha: float) -> None:
        super().__init__()
        self.compressor, self.labeler, self.linear_probe = compressor, labeler, linear_probe
        self.alpha = float(alpha)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        code = self.compressor(features)  # (B, D, h, w)
        out = {"code": code, "cluster_logits": self.alpha * self.labeler.global_scores(code)}
        if self.linear_probe is not None:
            out["linear_logits"] = self.linear_probe(code)
        return out
