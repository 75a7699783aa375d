"""Model name -> architecture and official weight file, as one plain dict literal.

Keys of a spec: family ("dinov2" | "dino"), patch_size, embed_dim, depth, num_heads, ffn ("mlp" | "swiglu"),
num_register_tokens, pos_grid (side of the trained position grid: 518/14 = 37 for DINOv2, 224/p for DINO),
pos_interpolation (see pos_embed.py), file (torch hub cache name), url_path (appended to the base URL).
"""

from typing import Any

import torch

from dinov2_patched.vision_transformer import VisionTransformer

_REGISTERS = 4


def _dinov2(size: str, dim: int, depth: int, heads: int, registers: int = 0) -> dict[str, Any]:
    """Spec of a DINOv2 model trained at 518 px (37 x 37 position grid); `size` is s, b, l or g."""
    reg = f"_reg{registers}" if registers else ""
    return {
        "family": "dinov2", "patch_size": 14, "embed_dim": dim, "depth": depth, "num_heads": heads,
        "ffn": "swiglu" if size == "g" else "mlp", "num_register_tokens": registers, "pos_grid": 37,
        # The official hub builds register models with size-based antialiased resizing, the others without.
        "pos_interpolation": "size_antialias" if registers else "offset",
        "file": f"dinov2_vit{size}14{reg}_pretrain.pth",
        "url_path": f"/dinov2/dinov2_vit{size}14/dinov2_vit{size}14{reg}_pretrain.pth",
    }


def _dino(stem: str, patch: int, dim: int, heads: int) -> dict[str, Any]:
    """Spec of a DINO v1 model trained at 224 px; `stem` is the official file stem (e.g. dino_deitsmall16)."""
    return {
        "family": "dino", "patch_size": patch, "embed_dim": dim, "depth": 12, "num_heads": heads, "ffn": "mlp",
        "num_register_tokens": 0, "pos_grid": 224 // patch, "pos_interpolation": "offset",
        "file": f"{stem}_pretrain.pth", "url_path": f"/dino/{stem}_pretrain/{stem}_pretrain.pth",
    }


MODEL_SPECS: dict[str, dict[str, Any]] = {
    "dinov2_vits14": _dinov2("s", 384, 12, 6),
    "dinov2_vitb14": _dinov2("b", 768, 12, 12),
    "dinov2_vitl14": _dinov2("l", 1024, 24, 16),
    "dinov2_vitg14": _dinov2("g", 1536, 40, 24),
    "dinov2_vits14_reg": _dinov2("s", 384, 12, 6, registers=_REGISTERS),
    "dinov2_vitb14_reg": _dinov2("b", 768, 12, 12, registers=_REGISTERS),
    "dinov2_vitl14_reg": _dinov2("l", 1024, 24, 16, registers=_REGISTERS),
    "dinov2_vitg14_reg": _dinov2("g", 1536, 40, 24, registers=_REGISTERS),
    "dino_vits16": _dino("dino_deitsmall16", 16, 384, 6),
    "dino_vits8": _dino("dino_deitsmall8", 8, 384, 6),
    "dino_vitb16": _dino("dino_vitbase16", 16, 768, 12),
    "dino_vitb8": _dino("dino_vitbase8", 8, 768, 12),
}

MODEL_NAMES: tuple[str, ...] = tuple(MODEL_SPECS)


def model_spec(name: str) -> dict[str, Any]:
    """A copy of the spec of `name`; ValueError listing the known names for an unknown one."""
    if name not in MODEL_SPECS:
        raise ValueError(f"Unknown model name {name!r}; known names: {', '.join(MODEL_NAMES)}.")
    return dict(MODEL_SPECS[name])


def vit_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    """VisionTransformer keyword arguments for a spec (DINOv2 has LayerScale and a mask token, DINO neither)."""
    is_v2 = spec["family"] == "dinov2"
    return {
        "patch_size": spec["patch_size"],
        "embed_dim": spec["embed_dim"],
        "depth": spec["depth"],
        "num_heads": spec["num_heads"],
        "ffn": spec["ffn"],
        "layer_scale": is_v2,
        "mask_token": is_v2,
        "num_register_tokens": spec["num_register_tokens"],
        "pos_grid": spec["pos_grid"],
        "pos_interpolation": spec["pos_interpolation"],
    }


def create_model(name: str, device: torch.device | str = "meta") -> VisionTransformer:
    """The architecture of `name` with UNINITIALISED parameters on `device` (default: meta, no memory).

    Built on the meta device first so that no default initialiser draws from the global RNG.
    """
    spec = model_spec(name)
    with torch.device("meta"):
        model = VisionTransformer(**vit_kwargs(spec), model_name=name)
    if torch.device(device).type != "meta":
        model = model.to_empty(device=device)
    return model
