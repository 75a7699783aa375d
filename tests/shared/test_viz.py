"""Palettes, colouring and PNG outputs."""

import numpy as np
import pytest
import torch
from PIL import Image

from shared.viz import (
    clusters_to_classes,
    colorize,
    grid_size,
    overlay,
    palette_for,
    save_grid,
    to_uint8_image,
    uncertainty_colormap,
)


@pytest.mark.parametrize("name,n", [("cocostuff27", 27), ("cityscapes27", 27), ("potsdam3", 3), ("potsdam6", 6),
                                    ("camvid", 11), ("folder", 27)])
def test_palettes_have_distinct_non_black_colours(name, n):
    pal = palette_for(name)
    assert pal.shape == (n, 3) and pal.dtype == np.uint8
    assert not (pal == 0).all(axis=1).any()  # black is reserved for ignored pixels
    if name != "cityscapes27":  # Cityscapes itself gives pole and polegroup the same colour
        assert len({tuple(c) for c in pal}) == n


def test_known_colours_and_extension():
    assert tuple(palette_for("cityscapes27")[0]) == (128, 64, 128)  # road
    assert tuple(palette_for("camvid")[3]) == (128, 64, 128)  # road
    assert tuple(palette_for("cocostuff27")[0]) == (128, 0, 0)  # PASCAL entry 1
    ext = palette_for("potsdam3", n_colors=5)
    assert ext.shape == (5, 3) and np.array_equal(ext[:3], palette_for("potsdam3"))


def test_colorize_overlay_and_mapping():
    pal = palette_for("potsdam3")
    labels = np.array([[0, 1], [-1, 2]])
    rgb = colorize(torch.from_numpy(labels), pal)
    assert np.array_equal(rgb[0, 1], pal[1]) and np.array_equal(rgb[1, 0], [0, 0, 0])
    with pytest.raises(ValueError, match="palette of 3"):
        colorize(np.array([[3]]), pal)
    assert np.array_equal(clusters_to_classes(np.array([[0, 2], [1, 1]]), [2, -1, 0]), [[2, 0], [-1, -1]])
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    assert np.array_equal(overlay(image, rgb, alpha=0.5)[1, 0], [50, 50, 50])
    normalised = (torch.full((3, 2, 2), 0.5) - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(3, 1, 1)
    assert (to_uint8_image(normalised) == 128).all()


def test_uncertainty_colormap_range_and_nan():
    v = np.array([[0.0, 0.5], [1.0, np.nan]])
    rgb = uncertainty_colormap(v)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert (rgb[1, 1] == 0).all()
    assert rgb[1, 0].astype(int).sum() > rgb[0, 0].astype(int).sum()  # magma: brighter for larger values


def test_save_grid_writes_png_of_expected_size(tmp_path):
    pal = palette_for("camvid")
    label = colorize(np.random.default_rng(0).integers(-1, 11, size=(20, 30)), pal)
    small = np.zeros((10, 15), dtype=np.uint8)  # grey panel, scaled up to the cell size
    path = tmp_path / "grid.png"
    size = save_grid([[label, small, None], [label, label]], path, titles=["image", "gt", "pred"])
    assert size == grid_size(2, 3, (20, 30), titled=True)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size == (3 * 30 + 4 * 4, 2 * (20 + 14) + 3 * 4)
        arr = np.asarray(im.convert("RGB"))
    assert np.array_equal(arr[4 + 14, 4], label[0, 0])
    with pytest.raises(ValueError, match="no panels"):
        save_grid([[None]], tmp_path / "empty.png")
