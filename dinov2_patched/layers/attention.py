"""Multi-head self-attention with a fused fast path and an explicit path that exposes its maps.

The fast path is `F.scaled_dot_product_attention`, or xformers' memory-efficient attention on CUDA when
xformers imports and `XFORMERS_DISABLED` is not set. The choice is made on every call from the tensor's
device, so an installed xformers can never break a CPU run and a missing one takes the same path as a
disabled one.
"""

import functools
import os
from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class AttentionMaps(NamedTuple):
    """What the explicit path exposes for one block.

    attention: (B, heads, T, T) softmax weights, exactly the ones multiplied with `v` to give the output.
    q, k, v: (B, heads, T, head_dim) each; `q` is not yet multiplied by the 1/sqrt(head_dim) scale.
    """

    attention: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


@functools.lru_cache(maxsize=1)
def _import_xformers_ops() -> ModuleType | None:
    """xformers.ops, or None when it does not import (cached: importing is slow, the answer cannot change)."""
    try:
        import xformers.ops as xops  # noqa: PLC0415  (optional dependency, only wanted on CUDA)
    except Exception:  # any failure (missing, broken build, CUDA mismatch) means: use PyTorch's kernel
        return None
    return xops


def xformers_ops_for(device: torch.device) -> ModuleType | None:
    """xformers.ops when it should be used for tensors on `device`, else None."""
    # Set at all (even empty) means disabled, as in the official dinov2 code.
    if device.type != "cuda" or "XFORMERS_DISABLED" in os.environ:
        return None
    return _import_xformers_ops()


class Attention(nn.Module):
    """Self-attention with a joint `qkv` projection (with bias) and an output `proj`, as in the checkpoints."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Embedding dim {dim} is not divisible by the number of heads {num_heads}.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_maps: bool = False) -> tuple[torch.Tensor, AttentionMaps | None]:
        """(B, T, C) -> ((B, T, C), maps or None); the explicit path runs only when `return_maps`."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        if return_maps:
            out, maps = self._explicit(qkv)
        else:
            out, maps = self._fused(qkv), None
        return self.proj(out.reshape(batch, tokens, dim)), maps

    def _fused(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv (B, T, 3, heads, hd) -> (B, T, heads, hd) through a fused kernel."""
        xops = xformers_ops_for(qkv.device)
        if xops is not None:
            q, k, v = qkv.unbind(2)  # xformers wants (B, T, heads, hd)
            return xops.memory_efficient_attention(q, k, v)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, T, hd) each
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    def _explicit(self, qkv: torch.Tensor) -> tuple[torch.Tensor, AttentionMaps]:
        """qkv (B, T, 3, heads, hd) -> ((B, T, heads, hd), maps) with a materialised softmax."""
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, T, hd) each
        logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, T, T)
        # Softmax in float32 even under autocast; the cast-back weights are the ones used and returned.
        weights = logits.float().softmax(dim=-1).to(v.dtype)
        out = (weights @ v).transpose(1, 2)
        return out, AttentionMaps(weights, q, k, v)
