"""get_intermediate_layers with the official semantics, and input-size checks."""

import pytest
import torch


@pytest.fixture
def setup(tiny_model):
    model = tiny_model("dinov2_reg_swiglu")  # 3 blocks, 4 registers, patch 4
    images = torch.randn(2, 3, 12, 20)  # grid 3 x 5
    with torch.no_grad():
        explicit = model.forward_features(images, return_qkv=True)
    return model, images, explicit


def block_outputs(model, images):
    """Outputs of every block, recomputed by calling the blocks one by one."""
    tokens, outs = model.prepare_tokens(images), []
    for block in model.blocks:
        tokens, _ = block(tokens)
        outs.append(tokens)
    return outs


def test_int_n_takes_the_last_blocks_and_list_takes_indices(setup):
    model, images, _ = setup
    with torch.no_grad():
        outs = block_outputs(model, images)
        last_two = model.get_intermediate_layers(images, n=2, norm=False)
        listed = model.get_intermediate_layers(images, n=[2, 0], norm=False)  # returned in block order
        negative = model.get_intermediate_layers(images, n=[-3], norm=False)
    assert len(last_two) == 2 and len(listed) == 2
    assert torch.allclose(last_two[0], outs[1][:, 5:]) and torch.allclose(last_two[1], outs[2][:, 5:])
    assert torch.allclose(listed[0], outs[0][:, 5:]) and torch.allclose(listed[1], outs[2][:, 5:])
    assert torch.allclose(negative[0], outs[0][:, 5:])


def test_norm_reshape_and_class_token(setup):
    model, images, explicit = setup
    with torch.no_grad():
        (flat,) = model.get_intermediate_layers(images, n=1)
        ((grid, cls),) = model.get_intermediate_layers(images, n=1, reshape=True, return_class_token=True)
        (raw,) = model.get_intermediate_layers(images, n=1, norm=False)
    assert flat.shape == (2, 15, 24)
    assert torch.allclose(flat, explicit["x_norm_patchtokens"], atol=1e-4)
    assert grid.shape == (2, 24, 3, 5)
    assert torch.equal(grid[:, :, 1, 2], flat[:, 1 * 5 + 2])  # row-major patch order
    assert torch.allclose(cls, explicit["x_norm_clstoken"], atol=1e-4)
    assert torch.allclose(raw, explicit["x_prenorm"][:, 5:], rtol=1e-5, atol=1e-4)
    assert not torch.allclose(raw, flat)


def test_invalid_block_selection(setup):
    model, images, _ = setup
    with pytest.raises(ValueError, match="n=4"):
        model.get_intermediate_layers(images, n=4)
    with pytest.raises(ValueError, match="Block index 3"):
        model.get_intermediate_layers(images, n=[3])


def test_size_not_divisible_by_patch(setup):
    model, _, _ = setup
    with pytest.raises(ValueError, match=r"13x20 is not divisible by the patch size 4"):
        model.forward_features(torch.randn(1, 3, 13, 20))


def test_blocks_after_the_last_requested_one_are_skipped(setup):
    model, images, _ = setup
    calls = []
    hook = model.blocks[2].register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            (early,) = model.get_intermediate_layers(images, n=[1], norm=False)
            maps = model.get_block_qkv(images, [0, 1])
        assert calls == []
        model.get_intermediate_layers(images, n=1)
        assert calls == [1]
    finally:
        hook.remove()
    assert torch.allclose(early, block_outputs(model, images)[1][:, 5:])
    assert [m.k.shape[2] for m in maps] == [20, 20]
