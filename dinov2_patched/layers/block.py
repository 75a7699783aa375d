"""Pre-norm transformer block: `x + ls1(attn(norm1(x)))`, then `x + ls2(mlp(norm2(x)))`."""

import torch
from torch import nn

from dinov2_patched.layers.attention import Attention, AttentionMaps
from dinov2_patched.layers.layer_scale import LayerScale
from dinov2_patched.layers.mlp import Mlp
from dinov2_patched.layers.swiglu import SwiGLUFFN, swiglu_hidden_features

LAYER_NORM_EPS = 1e-6  # both DINO and DINOv2 build their LayerNorms with eps=1e-6


class Block(nn.Module):
    """One transformer block; `layer_scale=False` gives the DINO v1 block (no `ls1`/`ls2` parameters)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, ffn: str, layer_scale: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        if ffn == "mlp":
            self.mlp: nn.Module = Mlp(dim, int(dim * mlp_ratio))
        elif ffn == "swiglu":
            self.mlp = SwiGLUFFN(dim, swiglu_hidden_features(dim, mlp_ratio))
        else:
            raise ValueError(f"Unknown feed-forward type {ffn!r}; expected 'mlp' or 'swiglu'.")
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor, return_maps: bool = False) -> tuple[torch.Tensor, AttentionMaps | None]:
        """(B, T, C) -> ((B, T, C), attention maps when `return_maps` else None)."""
        attended, maps = self.attn(self.norm1(x), return_maps=return_maps)
        x = _add_residual(x, attended, self.ls1)
        x = _add_residual(x, self.mlp(self.norm2(x)), self.ls2)
        return x, maps


def _add_residual(residual: torch.Tensor, branch: torch.Tensor, scale: nn.Module) -> torch.Tensor:
    """`residual + scale(branch)`; LayerScale fuses its multiply into the addition."""
    if isinstance(scale, LayerScale):
        return scale.add_to(residual, branch)
    return residual + scale(branch)
