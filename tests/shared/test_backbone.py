"""shared.backbone: the frozen featurizer (tiny random ViTs, CPU)."""

import pytest
import torch
import torch.nn.functional as F

import shared.backbone as backbone_module
from dinov2_patched import VisionTransformer
from dinov2_patched.init import init_random_weights
from shared import dist as sdist
from shared.backbone import FrozenBackbone, bf16_supported, build_backbone


def tiny_vit(registers: int = 4) -> VisionTransformer:
    model = VisionTransformer(patch_size=4, embed_dim=32, depth=4, num_heads=4, num_register_tokens=registers,
                              pos_grid=6, pos_interpolation="size_antialias" if registers else "offset",
                              model_name="tiny")
    init_random_weights(model)
    model.weights_id = "random-seed0"
    return model


def test_frozen_outputs_and_attributes():
    frozen = FrozenBackbone(tiny_vit(), layer=-2, force_float32=True)
    images = torch.randn(2, 3, 16, 24)
    frozen.train()  # must stay frozen
    features = frozen(images)
    assert not frozen.training and not frozen.model.training
    assert all(not p.requires_grad for p in frozen.parameters())
    assert features.shape == (2, 32, 4, 6) and features.dtype == torch.float32 and not features.requires_grad
    with torch.no_grad():
        (expected,) = frozen.model.get_intermediate_layers(images, n=[2], reshape=True)
    assert torch.equal(features, expected)
    assert (frozen.name, frozen.patch_size, frozen.feature_dim, frozen.layer) == ("tiny", 4, 32, -2)
    assert frozen.weights_id == "random-seed0" and frozen.pretrained is False and frozen.use_bf16 is False


def test_keys_merge_heads_of_requested_blocks():
    frozen = FrozenBackbone(tiny_vit(), force_float32=True)
    images = torch.randn(1, 3, 8, 12)  # grid 2 x 3
    keys = frozen.keys(images, blocks=(1, -1))
    with torch.no_grad():
        qkv = frozen.model.forward_features(images, return_qkv=True)["qkv"]
    assert keys.shape == (1, 2 * 32, 2, 3)
    heads, head_dim = 4, 8
    for slot, block in enumerate((1, 3)):
        k = qkv[block][1]  # (B, heads, T, hd), T = 1 + 4 registers + 6 patches
        for h in range(heads):
            channels = keys[0, slot * 32 + h * head_dim : slot * 32 + (h + 1) * head_dim]  # (hd, 2, 3)
            assert torch.allclose(channels[:, 1, 2], k[0, h, 5 + 1 * 3 + 2], atol=1e-6)


def test_last_attention():
    frozen = FrozenBackbone(tiny_vit(registers=0), force_float32=True)
    images = torch.randn(2, 3, 8, 8)
    attention = frozen.last_attention(images)
    assert attention.shape == (2, 4, 5, 5) and attention.dtype == torch.float32
    assert torch.allclose(attention.sum(-1), torch.ones(()), atol=1e-5)
    with torch.no_grad():
        expected = frozen.model.forward_features(images, return_attention=True)["attentions"][-1]
    assert torch.allclose(attention, expected, atol=1e-5)  # the last block's map, not any stochastic matrix


def test_invalid_layer():
    with pytest.raises(ValueError, match=r"names blocks \[4\], but the backbone has 4 blocks"):
        FrozenBackbone(tiny_vit(), layer=4)


def test_keys_descriptor_equals_the_explicit_attention_path():
    """Keys read from the qkv projection (fused attention, no T x T matrix) equal the keys of the explicit path."""
    frozen = FrozenBackbone(tiny_vit(), force_float32=True)
    keys = frozen.with_features({"kind": "keys", "blocks": [-3, -1]})
    images = torch.randn(2, 3, 8, 12)
    assert keys.feature_dim == 2 * 32 and keys.model is frozen.model
    out = keys(images)  # (B, 2C, h, w)
    with torch.no_grad():
        maps = frozen.model.get_block_qkv(images, [-3, -1])
    first_patch = 1 + frozen.model.num_register_tokens
    expected = torch.cat([m.k[:, :, first_patch:].permute(0, 1, 3, 2).reshape(2, 32, 2, 3) for m in maps], dim=1)
    assert out.shape == (2, 64, 2, 3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_descriptor_the_backbone_cannot_produce():
    from shared.features import DescriptorError

    with pytest.raises(DescriptorError, match=r"names blocks \[-9\], but the backbone has 4 blocks"):
        FrozenBackbone(tiny_vit(), features={"kind": "keys", "blocks": [-1, -9]})
    with pytest.raises(DescriptorError, match="kind 'values' is unknown"):
        build_backbone("dino_vits16", weights="none", features={"kind": "values"})


def test_build_backbone_random_weights():
    frozen = build_backbone("dino_vits16", weights="none", layer=-1, force_float32=True)
    assert (frozen.name, frozen.patch_size, frozen.feature_dim) == ("dino_vits16", 16, 384)
    assert frozen.pretrained is False and frozen.weights_id == "random-seed0"
    assert frozen(torch.randn(1, 3, 32, 48)).shape == (1, 384, 2, 3)
    assert build_backbone("dino_vits16", weights="none", device="auto").device == sdist.resolve_device("auto")


def test_build_backbone_rejects_an_unknown_device_before_loading_weights(tmp_path):
    with pytest.raises(ValueError, match="Unknown device 'tpu'"):
        build_backbone("dino_vits16", weights=tmp_path / "not_there.pth", device="tpu")


@pytest.mark.parametrize(
    ("capability", "flags", "expected"),
    [("AVX512", {"avx512_bf16"}, True), ("AVX512", {"amx_bf16"}, True), ("AVX512", set(), False),
     ("AVX2", {"avx512_bf16"}, False)],
)
def test_bf16_detection_on_cpu(monkeypatch, capability, flags, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(backbone_module, "_cpu_flags", lambda: flags)
    assert bf16_supported("cpu") is expected


@pytest.mark.skipif(not bf16_supported("cpu"), reason="this CPU has no native bf16")
def test_bf16_close_to_float32():
    images = torch.randn(2, 3, 16, 24)
    fast, exact = FrozenBackbone(tiny_vit()), FrozenBackbone(tiny_vit(), force_float32=True)
    assert fast.use_bf16 and not exact.use_bf16
    low, high = fast(images), exact(images)
    assert low.dtype == torch.float32
    assert not torch.equal(low, high)  # bf16 really ran
    assert F.cosine_similarity(low, high, dim=1).min() > 0.99
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # pre-cast weights change nothing
        (plain_autocast,) = tiny_vit().get_intermediate_layers(images, n=1, reshape=True)
    assert torch.equal(low, plain_autocast.float())
    assert fast.keys(images).dtype == fast.last_attention(images).dtype == torch.float32
