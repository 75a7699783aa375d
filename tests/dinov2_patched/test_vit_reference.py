"""Our ViT against an independent float64 re-derivation from the formulas (no code shared with the model).

The reference works on the state dict alone: patch embedding as a matrix product over unfolded patches,
bicubic position resizing as explicit 1-D weight matrices (Keys kernel a=-0.75 with PyTorch's half-pixel
mapping from the scale factor; antialiased: support-widened kernel a=-0.5, normalised), pre-norm blocks,
softmax attention, LayerScale, registers inserted after the position embeddings.
"""

import math

import pytest
import torch


def keys_cubic(t: float, a: float) -> float:
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def cubic_matrix_scale_factor(n_in: int, scale_factor: float) -> torch.Tensor:
    """(n_out, n_in) weights of bicubic resizing with a given scale factor, no antialiasing."""
    n_out = math.floor(n_in * scale_factor)
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = (i + 0.5) / scale_factor - 0.5
        base = math.floor(src)
        for k in range(-1, 3):
            weights[i, min(max(base + k, 0), n_in - 1)] += keys_cubic(src - (base + k), -0.75)
    return weights


def cubic_matrix_antialias(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of antialiased bicubic resizing to an explicit size."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        row = torch.tensor([keys_cubic((j - center + 0.5) / stretch, -0.5) for j in range(lo, hi)], dtype=torch.float64)
        weights[i, lo:hi] = row / row.sum()
    return weights


def reference_pos_embed(pos: torch.Tensor, grid_h: int, grid_w: int, rule: str) -> torch.Tensor:
    side = math.isqrt(pos.shape[1] - 1)
    if (grid_h, grid_w) == (side, side):
        return pos
    table = pos[0, 1:].reshape(side, side, -1)
    if rule == "offset":
        rows = cubic_matrix_scale_factor(side, (grid_h + 0.1) / side)
        cols = cubic_matrix_scale_factor(side, (grid_w + 0.1) / side)
    else:
        rows, cols = cubic_matrix_antialias(side, grid_h), cubic_matrix_antialias(side, grid_w)
    resized = torch.einsum("ai,ijc,bj->abc", rows, table, cols).reshape(grid_h * grid_w, -1)
    return torch.cat([pos[0, :1], resized])[None]


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6) * weight + bias


def reference_forward(sd: dict, images: torch.Tensor, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (final normed tokens (B, T, C), last block attention (B, heads, T, T)), all in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    x = images.double()
    batch, chans, height, width = x.shape
    p, dim, heads = cfg["patch_size"], cfg["embed_dim"], cfg["num_heads"]
    grid_h, grid_w = height // p, width // p
    patches = x.reshape(batch, chans, grid_h, p, grid_w, p).permute(0, 2, 4, 1, 3, 5).reshape(batch, -1, chans * p * p)
    tokens = patches @ sd["patch_embed.proj.weight"].reshape(dim, -1).T + sd["patch_embed.proj.bias"]
    tokens = torch.cat([sd["cls_token"].expand(batch, 1, dim), tokens], 1)
    tokens = tokens + reference_pos_embed(sd["pos_embed"], grid_h, grid_w, cfg["pos_interpolation"])
    if cfg["num_register_tokens"]:
        regs = sd["register_tokens"].expand(batch, -1, -1)
        tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], 1)
    hd = dim // heads
    for i in range(cfg["depth"]):
        b = lambda name: sd[f"blocks.{i}.{name}"]  # noqa: B023
        h = layer_norm(tokens, b("norm1.weight"), b("norm1.bias"))
        qkv = h @ b("attn.qkv.weight").T + b("attn.qkv.bias")
        q, k, v = (qkv[..., j * dim : (j + 1) * dim].reshape(batch, -1, heads, hd).transpose(1, 2) for j in range(3))
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1)
        mixed = (attention @ v).transpose(1, 2).reshape(batch, -1, dim)
        out = mixed @ b("attn.proj.weight").T + b("attn.proj.bias")
        tokens = tokens + (out * b("ls1.gamma") if cfg["layer_scale"] else out)
        h = layer_norm(tokens, b("norm2.weight"), b("norm2.bias"))
        if cfg["ffn"] == "mlp":
            h = h @ b("mlp.fc1.weight").T + b("mlp.fc1.bias")
            h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
            h = h @ b("mlp.fc2.weight").T + b("mlp.fc2.bias")
        else:
            hidden = b("mlp.w3.weight").shape[1]
            h12 = h @ b("mlp.w12.weight").T + b("mlp.w12.bias")
            gate, value = h12[..., :hidden], h12[..., hidden:]
            h = (gate * torch.sigmoid(gate) * value) @ b("mlp.w3.weight").T + b("mlp.w3.bias")
        tokens = tokens + (h * b("ls2.gamma") if cfg["layer_scale"] else h)
    return layer_norm(tokens, sd["norm.weight"], sd["norm.bias"]), attention


@pytest.mark.parametrize("config", ["dinov2", "dinov2_reg_swiglu", "dino"])
@pytest.mark.parametrize("grid", [(3, 7), (6, 4)])
def test_matches_float64_reference(tiny_model, tiny_configs, config, grid):
    cfg = tiny_configs[config]
    model = tiny_model(config)
    p = cfg["patch_size"]
    images = torch.randn(2, 3, grid[0] * p, grid[1] * p, generator=torch.Generator().manual_seed(1))
    expected, expected_attention = reference_forward(model.state_dict(), images, cfg)
    with torch.no_grad():
        out = model.forward_features(images, return_attention=True)
        plain = model.forward_features(images)
    first_patch = 1 + cfg["num_register_tokens"]
    for key, ref in [
        ("x_norm_clstoken", expected[:, 0]),
        ("x_norm_regtokens", expected[:, 1:first_patch]),
        ("x_norm_patchtokens", expected[:, first_patch:]),
    ]:
        assert out[key].dtype == torch.float32 and out[key].shape == ref.shape
        if ref.numel():
            assert (out[key].double() - ref).abs().max() < 1e-4, key
            assert (plain[key].double() - ref).abs().max() < 1e-4, key  # fused attention path
    assert (out["attentions"][-1].double() - expected_attention).abs().max() < 1e-5


def test_square_trained_grid_uses_embeddings_unchanged(tiny_model, tiny_configs):
    """At the trained grid (5x5 here) nothing is interpolated, as in the official code."""
    model = tiny_model("dinov2")
    images = torch.randn(1, 3, 20, 20)
    expected, _ = reference_forward(model.state_dict(), images, {**tiny_configs["dinov2"], "pos_interpolation": "none"})
    with torch.no_grad():
        got = model.forward_features(images)["x_norm_patchtokens"]
    assert (got.double() - expected[:, 1:]).abs().max() < 1e-4
