"""Every model name accepts a checkpoint in the official key layout with strict=True.

The expected layout is written out here from the published architectures, independently of the model code.
"""

import pytest
import torch

from dinov2_patched import MODEL_NAMES, build_model, model_spec
from dinov2_patched.models import create_model
from dinov2_patched.weights import check_architecture

# name: (family, patch, dim, depth, registers, swiglu)
ARCHITECTURES = {
    "dinov2_vits14": ("v2", 14, 384, 12, 0, False),
    "dinov2_vitb14": ("v2", 14, 768, 12, 0, False),
    "dinov2_vitl14": ("v2", 14, 1024, 24, 0, False),
    "dinov2_vitg14": ("v2", 14, 1536, 40, 0, True),
    "dinov2_vits14_reg": ("v2", 14, 384, 12, 4, False),
    "dinov2_vitb14_reg": ("v2", 14, 768, 12, 4, False),
    "dinov2_vitl14_reg": ("v2", 14, 1024, 24, 4, False),
    "dinov2_vitg14_reg": ("v2", 14, 1536, 40, 4, True),
    "dino_vits16": ("v1", 16, 384, 12, 0, False),
    "dino_vits8": ("v1", 8, 384, 12, 0, False),
    "dino_vitb16": ("v1", 16, 768, 12, 0, False),
    "dino_vitb8": ("v1", 8, 768, 12, 0, False),
}


def official_layout(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official checkpoint of `name`."""
    family, p, c, depth, registers, swiglu = ARCHITECTURES[name]
    grid = 37 if family == "v2" else 224 // p
    layout = {"cls_token": (1, 1, c), "pos_embed": (1, 1 + grid * grid, c)}
    if registers:
        layout["register_tokens"] = (1, registers, c)
    if family == "v2":
        layout["mask_token"] = (1, c)
    layout |= {"patch_embed.proj.weight": (c, 3, p, p), "patch_embed.proj.bias": (c,)}
    for i in range(depth):
        block = {
            "norm1.weight": (c,), "norm1.bias": (c,),
            "attn.qkv.weight": (3 * c, c), "attn.qkv.bias": (3 * c,),
            "attn.proj.weight": (c, c), "attn.proj.bias": (c,),
            "norm2.weight": (c,), "norm2.bias": (c,),
        }
        if swiglu:  # official ViT-g/14 files: w12 (8192, 1536), w3 (1536, 4096)
            block |= {"mlp.w12.weight": (8192, c), "mlp.w12.bias": (8192,),
                      "mlp.w3.weight": (c, 4096), "mlp.w3.bias": (c,)}
        else:
            block |= {"mlp.fc1.weight": (4 * c, c), "mlp.fc1.bias": (4 * c,),
                      "mlp.fc2.weight": (c, 4 * c), "mlp.fc2.bias": (c,)}
        if family == "v2":
            block |= {"ls1.gamma": (c,), "ls2.gamma": (c,)}
        layout |= {f"blocks.{i}.{key}": shape for key, shape in block.items()}
    return layout | {"norm.weight": (c,), "norm.bias": (c,)}


def test_every_model_name_is_covered():
    assert set(MODEL_NAMES) == set(ARCHITECTURES)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_official_layout_loads_strictly(name):
    model = create_model(name)  # meta device: no memory even for ViT-g
    layout = official_layout(name)
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert ours == layout
    fake_checkpoint = {key: torch.empty(shape, device="meta") for key, shape in layout.items()}
    check_architecture(fake_checkpoint, model, "fake.pth", name)
    model.load_state_dict(fake_checkpoint, strict=True, assign=True)
    spec = model_spec(name)
    assert (model.patch_size, model.embed_dim, model.n_blocks) == (spec["patch_size"], spec["embed_dim"], spec["depth"])
    assert model.num_register_tokens == ARCHITECTURES[name][4]


def test_official_format_file_loads_with_build_model(tmp_path):
    """A real file end to end (DINO v1 files are loaded the same way in test_weights.py)."""
    name = "dinov2_vits14_reg"
    generator = torch.Generator().manual_seed(3)
    checkpoint = {key: torch.randn(shape, generator=generator) for key, shape in official_layout(name).items()}
    path = tmp_path / "weights.pth"
    torch.save(checkpoint, path)
    model = build_model(name, weights=path)
    assert model.weights_id.startswith("sha256-")
    for key, value in model.state_dict().items():
        assert torch.equal(value, checkpoint[key]), key
    with torch.no_grad():
        out = model.forward_features(torch.randn(1, 3, 2 * model.patch_size, 3 * model.patch_size))
    assert out["x_norm_patchtokens"].shape == (1, 6, model.embed_dim)
    assert torch.isfinite(out["x_prenorm"]).all()


def test_dino_training_wrapper_is_unwrapped(tmp_path):
    """DINO v1 training checkpoints keep the backbone under `teacher` with `backbone.` prefixes and a head."""
    layout = official_layout("dino_vits16")
    teacher = {f"backbone.{key}": torch.zeros(shape) for key, shape in layout.items()}
    teacher["head.mlp.0.weight"] = torch.zeros(2, 384)
    torch.save({"teacher": teacher, "epoch": 3}, tmp_path / "checkpoint.pth")
    model = build_model("dino_vits16", weights=tmp_path / "checkpoint.pth")
    assert not model.norm.weight.detach().any()
