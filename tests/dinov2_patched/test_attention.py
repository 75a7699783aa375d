"""Fused vs explicit attention, the returned maps, and the per-call xformers choice."""

import math

import torch

from dinov2_patched.layers import Attention
from dinov2_patched.layers import attention as attention_module


def test_explicit_and_fused_paths_agree(tiny_model):
    model = tiny_model("dinov2_reg_swiglu")
    images = torch.randn(2, 3, 12, 28)
    with torch.no_grad():
        fused = model.forward_features(images)
        explicit = model.forward_features(images, return_attention=True, return_qkv=True)
    assert torch.allclose(fused["x_prenorm"], explicit["x_prenorm"], rtol=1e-5, atol=1e-4)
    tokens = 1 + 4 + 3 * 7
    assert len(explicit["attentions"]) == model.n_blocks and len(explicit["qkv"]) == model.n_blocks
    for attention, (q, k, v) in zip(explicit["attentions"], explicit["qkv"], strict=True):
        assert attention.shape == (2, model.num_heads, tokens, tokens)
        assert torch.allclose(attention.sum(-1), torch.ones(()), atol=1e-6)
        assert q.shape == k.shape == v.shape == (2, model.num_heads, tokens, model.embed_dim // model.num_heads)
        # The weights are the softmax of the returned (unscaled) q and k.
        assert torch.allclose(attention, torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1), atol=1e-6)


def test_returned_attention_reproduces_the_output():
    torch.manual_seed(0)
    layer = Attention(dim=12, num_heads=3).eval()
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        out, maps = layer(x, return_maps=True)
        fused, no_maps = layer(x)
        rebuilt = layer.proj((maps.attention @ maps.v).transpose(1, 2).reshape(2, 5, 12))
    assert no_maps is None
    assert torch.allclose(out, rebuilt, atol=1e-6)
    assert torch.allclose(out, fused, atol=1e-5)


def test_last_selfattention_equals_last_block_map(tiny_model):
    model = tiny_model("dino")
    images = torch.randn(1, 3, 16, 24)
    with torch.no_grad():
        last = model.get_last_selfattention(images)
        every = model.forward_features(images, return_attention=True)["attentions"]
    assert last.shape == (1, 4, 7, 7)
    assert torch.allclose(last, every[-1])


def test_xformers_choice_is_made_per_call(monkeypatch):
    fake = object()
    monkeypatch.setattr(attention_module, "_import_xformers_ops", lambda: fake)
    monkeypatch.delenv("XFORMERS_DISABLED", raising=False)
    assert attention_module.xformers_ops_for(torch.device("cpu")) is None
    assert attention_module.xformers_ops_for(torch.device("cuda")) is fake
    monkeypatch.setenv("XFORMERS_DISABLED", "1")
    assert attention_module.xformers_ops_for(torch.device("cuda")) is None
    monkeypatch.setenv("XFORMERS_DISABLED", "")  # set, even to nothing, disables it (official semantics)
    assert attention_module.xformers_ops_for(torch.device("cuda")) is None
    monkeypatch.setattr(attention_module, "_import_xformers_ops", lambda: None)  # not installed
    monkeypatch.delenv("XFORMERS_DISABLED")
    assert attention_module.xformers_ops_for(torch.device("cuda")) is None
