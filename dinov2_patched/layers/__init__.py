"""Building blocks of the DINO / DINOv2 vision transformers, one small module per file."""

from dinov2_patched.layers.attention import Attention, AttentionMaps
from dinov2_patched.layers.block import Block
from dinov2_patched.layers.layer_scale import LayerScale
from dinov2_patched.layers.mlp import Mlp
from dinov2_patched.layers.patch_embed import PatchEmbed
from dinov2_patched.layers.swiglu import SwiGLUFFN, swiglu_hidden_features

__all__ = [
    "Attention",
    "AttentionMaps",
    "Block",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "SwiGLUFFN",
    "swiglu_hidden_features",
]
