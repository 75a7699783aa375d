"""Frozen featurizer: a DINO / DINOv2 backbone by name that maps normalised images to feature maps.

backbone = build_backbone("dinov2_vits14")           # official weights, bf16 where the hardware has it
features = backbone(images)                          # (B, 384, H/14, W/14) float32
keys = backbone.with_features({"kind": "keys", "blocks": [-3, -2, -1]})   # same model, other features
keys(images)                                         # (B, 3 * 384, H/14, W/14)

What a featurizer returns is fixed by its feature descriptor (`shared.features`); the feature cache keys on it.
"""

import os
from pathlib import Path

import torch
from torch import nn

from dinov2_patched import RANDOM_WEIGHTS_ID, VisionTransformer, build_model
from dinov2_patched.weights import WeightsNotFoundError
from shared import dist as sdist
from shared.features import canonical_descriptor, feature_dim

_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to confirm native bf16, so stay in float32
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def bf16_supported(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 autocast is fast on `device`: CUDA with bf16, or a CPU with AVX512 plus AVX512-BF16 or AMX.

    On CPUs without native bf16 instructions autocast is emulated and slower than float32, hence the check.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    capability = torch.backends.cpu.get_cpu_capability()
    return "AVX512" in capability.upper() and bool(_cpu_flags() & set(_CPU_BF16_FLAGS))


def store_matmul_weights_in_bf16(model: nn.Module) -> None:
    """Converts the weights and biases of every Linear and Conv2d of `model` to bf16, in place.

    Under bf16 autocast these are cast to bf16 on every call anyway (with the same rounding), so the
    outputs are bitwise unchanged; casting once up front saves that work, about a third of a CPU forward.
    LayerNorm, LayerScale and the token/position parameters stay float32, as autocast keeps them.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            module.to(torch.bfloat16)


def snap_to_patch(resolution: int, patch: int) -> int:
    """Nearest multiple of the patch size (320 -> 322 for /14 backbones), so no border patch is dropped."""
    return max(patch, int(round(resolution / patch)) * patch)


class FrozenBackbone(nn.Module):
    """A ViT in eval mode without gradients; every call runs under no_grad and returns float32.

    Takes ownership of `model`: it is frozen in place, and when bf16 is used its Linear/Conv weights are
    stored in bf16 (see `store_matmul_weights_in_bf16`), so do not keep using the model outside.
    `features` is the feature descriptor (default: normed patch tokens of the last block); `layer` is the
    older shorthand for ``{"kind": "tokens", "layer": layer}``.
    Attributes: name, patch_size, feature_dim (channels of what `forward` returns), descriptor, layer (block of
    a tokens descriptor, else None), weights_id, pretrained (real weights loaded), use_bf16 (bf16 autocast on).
    """

    def __init__(self, model: VisionTransformer, *, features: dict | None = None, layer: int | None = None,
                 force_float32: bool = False) -> None:
        super().__init__()
        if features is None:
            features = {"kind": "tokens", "layer": -1 if layer is None else layer}
        elif layer is not None:
            raise ValueError("pass either features= or layer=, not both")
        self.descriptor = canonical_descriptor(features, n_blocks=model.n_blocks)
        blocks = [self.descriptor["layer"]] if self.descriptor["kind"] == "tokens" else self.descriptor["blocks"]
        model.block_indices(blocks)  # ValueError for a block the model does not have
        self.model = model.eval().requires_grad_(False)
        self.name = model.model_name
        self.patch_size = model.patch_size
        self.embed_dim = model.embed_dim
        self.feature_dim = feature_dim(self.descriptor, model.embed_dim)
        self.layer = self.descriptor.get("layer")
        self.weights_id = model.weights_id
        self.pretrained = model.weights_id != RANDOM_WEIGHTS_ID
        self.force_float32 = force_float32
        self.use_bf16 = not force_float32 and bf16_supported(self.device)
        if self.use_bf16:
            store_matmul_weights_in_bf16(self.model)

    def with_features(self, features: dict) -> "FrozenBackbone":
        """A featurizer for another descriptor over the same (shared, already frozen) model."""
        return FrozenBackbone(self.model, features=features, force_float32=self.force_float32)

    @property
    def device(self) -> torch.device:
        return self.model.cls_token.device

    def train(self, mode: bool = True) -> "FrozenBackbone":
        """Always stays in eval mode: the backbone is frozen."""
        return super().train(False)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def _grid(self, images: torch.Tensor) -> tuple[int, int]:
        return images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised images (B, 3, H, W) -> the descriptor's features (B, feature_dim, H/p, W/p)."""
        if self.descriptor["kind"] == "keys":
            return self.keys(images, tuple(self.descriptor["blocks"]))
        with self._autocast():
            (features,) = self.model.get_intermediate_layers(images, n=[self.layer], reshape=True, norm=True)
        return features.float()

    @torch.no_grad()
    def keys(self, images: torch.Tensor, blocks: tuple[int, ...] = (-3, -2, -1)) -> torch.Tensor:
        """Attention keys of `blocks`, heads merged, patches only: (B, len(blocks) * C, H/p, W/p).

        The keys are read from each block's `qkv` projection with a forward hook, so every block keeps its
        fused attention kernel and no (T, T) attention matrix is ever materialised.
        """
        grid_h, grid_w = self._grid(images)
        first_patch = 1 + self.model.num_register_tokens
        indices = [b % self.model.n_blocks for b in blocks]
        captured: dict[int, torch.Tensor] = {}
        hooks = [self.model.blocks[i].attn.qkv.register_forward_hook(
            lambda _m, _inp, out, i=i: captured.__setitem__(i, out)) for i in sorted(set(indices))]
        try:
            with self._autocast():
                self.model.get_intermediate_layers(images, n=[max(indices)], norm=False)  # stops after that block
        finally:
            for hook in hooks:
                hook.remove()
        merged = []
        for i in indices:
            qkv = captured[i]  # (B, T, 3 * C): q, k, v each laid out as (heads, head_dim)
            batch, _, three_c = qkv.shape
            keys = qkv[:, first_patch:, three_c // 3: 2 * three_c // 3]  # (B, N, C), heads merged
            merged.append(keys.float().transpose(1, 2).reshape(batch, three_c // 3, grid_h, grid_w))
        return torch.cat(merged, dim=1)

    @torch.no_grad()
    def last_attention(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax attention of the last block over all tokens [CLS, registers, patches]: (B, heads, T, T)."""
        with self._autocast():
            attention = self.model.get_last_selfattention(images)
        return attention.float()


def build_backbone(
    name: str,
    weights: str | os.PathLike | None = None,
    *,
    features: dict | None = None,
    layer: int | None = None,
    force_float32: bool = False,
    device: str | torch.device = "cpu",
) -> FrozenBackbone:
    """Frozen backbone `name` (a dinov2_patched.MODEL_NAMES entry); `weights` as in dinov2_patched.build_model.

    features: the feature descriptor (default: last block's tokens); layer: shorthand for a tokens descriptor.
    device: "auto", "cpu", "cuda" or "cuda:N", resolved by `shared.dist.resolve_device` (so "auto" and "cuda"
    mean this rank's GPU under torchrun). force_float32 turns bf16 autocast off.
    """
    target = sdist.resolve_device(device, sdist.get_local_rank())  # a bad device fails before any download
    canonical_descriptor(features)  # a malformed descriptor fails before any download
    try:
        model = build_model(name, weights).to(target)
    except WeightsNotFoundError as error:
        # The weights are named differently at each entry point; say which, so the advice can be followed as written.
        raise WeightsNotFoundError(f"{error} A trainer takes backbone_weights=<path> (backbone_weights=none for random "
                                   "weights), python -m compare.run --backbone-weights, the demo --weights.") from None
    return FrozenBackbone(model, features=features, layer=layer, force_float32=force_float32)
