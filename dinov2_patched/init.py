"""Deterministic random initialisation (`weights="none"`), independent of and not touching the global RNG."""

import math

import torch
from torch import nn

from dinov2_patched.layers import LayerScale
from dinov2_patched.vision_transformer import VisionTransformer

RANDOM_WEIGHTS_ID = "random-seed0"


@torch.no_grad()
def init_random_weights(model: VisionTransformer, seed: int = 0) -> None:
    """Fills every parameter in place from a local generator seeded with `seed`, in the official style.

    pos_embed and Linear weights: normal (std 0.02) folded into +-2 std; cls/register tokens: normal (std 1e-6);
    mask token and biases: 0; LayerNorm: 1 / 0; LayerScale: its init value; patch conv: PyTorch's default
    uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def fill(tensor: torch.Tensor, sample: torch.Tensor) -> None:
        # Sample on the CPU with the local generator, then copy: works for any device of the model.
        tensor.copy_(sample.to(tensor.dtype))

    def trunc_normal(shape: torch.Size, std: float) -> torch.Tensor:
        # Normal with the tails beyond 2 std folded back in (fmod): ~10x faster than nn.init.trunc_normal_'s
        # inverse-CDF sampling, which matters for building random ViT-L/g.
        return torch.randn(shape, generator=generator).fmod_(2.0) * std

    fill(model.pos_embed, trunc_normal(model.pos_embed.shape, 0.02))
    fill(model.cls_token, torch.randn(model.cls_token.shape, generator=generator) * 1e-6)
    if model.register_tokens is not None:
        fill(model.register_tokens, torch.randn(model.register_tokens.shape, generator=generator) * 1e-6)
    if model.mask_token is not None:
        model.mask_token.zero_()
    conv = model.patch_embed.proj
    bound = 1.0 / math.sqrt(conv.weight[0].numel())
    fill(conv.weight, torch.empty(conv.weight.shape).uniform_(-bound, bound, generator=generator))
    fill(conv.bias, torch.empty(conv.bias.shape).uniform_(-bound, bound, generator=generator))
    for module in model.modules():
        if isinstance(module, nn.Linear):
            fill(module.weight, trunc_normal(module.weight.shape, 0.02))
            module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, LayerScale):
            module.gamma.fill_(module.init_value)
