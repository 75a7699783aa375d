"""Tiny ViT configurations shared by the dinov2_patched tests (small enough for float64 references)."""

import pytest
import torch

from dinov2_patched import VisionTransformer

# Trained position grid 5x5; inputs in the tests use other, non-square grids so interpolation always runs.
TINY_CONFIGS = {
    "dinov2": dict(patch_size=4, embed_dim=24, depth=3, num_heads=3, ffn="mlp", layer_scale=True,
                   num_register_tokens=0, pos_grid=5, pos_interpolation="offset", mask_token=True),
    "dinov2_reg_swiglu": dict(patch_size=4, embed_dim=24, depth=3, num_heads=2, ffn="swiglu", layer_scale=True,
                              num_register_tokens=4, pos_grid=5, pos_interpolation="size_antialias", mask_token=True),
    "dino": dict(patch_size=8, embed_dim=16, depth=2, num_heads=4, ffn="mlp", layer_scale=False,
                 num_register_tokens=0, pos_grid=5, pos_interpolation="offset", mask_token=False),
}


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fills every parameter with random values (norm weights and LayerScale around 1), so nothing is trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("gamma") or (("norm" in name) and name.endswith("weight")):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.3 * noise)
    return model.eval()


@pytest.fixture
def tiny_model():
    """Factory: tiny_model(config_name, seed=0) -> randomly filled VisionTransformer in eval mode."""

    def make(config: str, seed: int = 0) -> VisionTransformer:
        return randomize(VisionTransformer(**TINY_CONFIGS[config], model_name=f"tiny_{config}"), seed)

    return make


@pytest.fixture
def tiny_configs() -> dict:
    return TINY_CONFIGS
