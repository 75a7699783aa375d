"""Loaders on tiny fixtures in the real on-disk formats; expected ids come from data.md, not from the code."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import scipy.io
import torch
from data_fixtures import make_cityscapes, make_coco, make_folder, make_potsdam, rgb, save_image

from shared.data import IMAGENET_MEAN, IMAGENET_STD, BadSampleError, DatasetLayoutError, build_dataset


def strip(values: list[int], shape=(4, 10)) -> np.ndarray:
    """A (4, 10) map whose first row holds `values` (then repeats the last one)."""
    out = np.full(shape, values[-1], dtype=np.int64)
    out[0, : len(values)] = values
    return out


def test_cocostuff_fine_to_coarse_follows_the_spec(tmp_path):
    # fine (0-indexed stuffthingmaps) -> coarse: person->person(9), car->vehicle(11), bird->animal(7),
    # sky-other->sky(23), water-other->water(26), grass->plant(22), unlabeled 255 -> -1.
    fine = strip([0, 2, 15, 156, 177, 123, 255])
    make_coco(tmp_path, {"000000000139": fine})
    ds = build_dataset("cocostuff27", "val", data_root=tmp_path)
    _, label = ds.load_raw(0)
    assert label[0, :7].tolist() == [9, 11, 7, 23, 26, 22, -1]
    assert ds.n_classes == 27 and ds.class_names[9] == "person" and ds.class_names[23] == "sky"


def test_cocostuff_unknown_fine_id_names_the_file(tmp_path):
    make_coco(tmp_path, {"000000000001": strip([0, 200])})
    ds = build_dataset("cocostuff27", "val", data_root=tmp_path)
    with pytest.raises(BadSampleError, match="000000000001.png"):
        ds[0]


def test_cocostuff_listed_file_missing_is_a_layout_error(tmp_path):
    make_coco(tmp_path, {"000000000001": strip([0]), "000000000002": strip([0])})
    (tmp_path / "cocostuff" / "annotations" / "val2017" / "000000000002.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"1 file.*Coco164kFull_Stuff_Coarse_7.txt.*000000000002\.png.*"
                                                 r"prepare cocostuff"):
        build_dataset("cocostuff27", "val", data_root=tmp_path)


def test_cityscapes_label_is_id_minus_7(tmp_path):
    make_cityscapes(tmp_path, {"lindau_000000_000019": strip([0, 6, 7, 8, 26, 33, 34, 255])})
    ds = build_dataset("cityscapes27", "val", data_root=tmp_path)
    _, label = ds.load_raw(0)
    assert label[0, :8].tolist() == [-1, -1, 0, 1, 19, 26, -1, -1]
    assert ds.class_names[0] == "road" and ds.class_names[19] == "car" and ds.class_names[26] == "bicycle"


@pytest.mark.parametrize(("name", "expected"), [
    ("potsdam6", [0, 1, 2, 3, 4, 5, -1]),
    ("potsdam3", [0, 1, 2, 2, 0, 1, -1]),  # {0,4}->0 roads/cars, {1,5}->1 buildings/clutter, {2,3}->2
])  # fmt: skip
def test_potsdam_mappings(tmp_path, name, expected):
    make_potsdam(tmp_path, {"t0": strip([0, 1, 2, 3, 4, 5, 255], shape=(8, 8))}, {"labelled_test": ["t0"]})
    ds = build_dataset(name, "val", data_root=tmp_path)
    image, label = ds.load_raw(0)
    assert label[0, :7].tolist() == expected
    img4 = scipy.io.loadmat(tmp_path / "potsdam" / "imgs" / "t0.mat")["img"]
    np.testing.assert_array_equal(np.asarray(image), img4[:, :, :3])  # RGB = first 3 of RGB+IR


def test_potsdam_missing_key_and_skip(tmp_path):
    tiles = {f"t{i}": np.zeros((8, 8)) for i in range(3)}
    make_potsdam(tmp_path, tiles, {"labelled_train": list(tiles)})
    scipy.io.savemat(tmp_path / "potsdam" / "gt" / "t1.mat", {"label": np.zeros((8, 8), np.uint8)})
    with pytest.raises(BadSampleError, match=r"t1\.mat.*'gt'"):
        build_dataset("potsdam6", "train", data_root=tmp_path)[1]
    with pytest.warns(UserWarning, match="skipped 1"):
        ds = build_dataset("potsdam6", "train", data_root=tmp_path, on_bad="skip")
    assert len(ds) == 2 and ds.n_skipped == 1 and "t1.mat" in ds.skipped[0]


def test_camvid_void_is_ignored_and_unknown_id_is_an_error(tmp_path):
    make_folder(tmp_path / "camvid", {"a": strip([0, 10, 11]), "b": strip([3, 12])})
    ds = build_dataset("camvid", "train", data_root=tmp_path)
    assert ds.load_raw(0)[1][0, :3].tolist() == [0, 10, -1]
    with pytest.raises(BadSampleError, match="b.png.*12"):
        ds.load_raw(1)


def test_folder_dataset_configurable_ignore_and_unlabelled(tmp_path):
    make_folder(tmp_path / "mine", {"x": strip([0, 1, 2, 7])})
    ds = build_dataset("folder", "train", data_root=tmp_path / "mine", n_classes=3, ignore_id=7)
    assert ds.load_raw(0)[1][0, :4].tolist() == [0, 1, 2, -1] and ds.has_labels
    make_folder(tmp_path / "plain", {"x": None, "y": None})
    ds = build_dataset("folder", "train", data_root=tmp_path / "plain")
    assert not ds.has_labels and ds.load_raw(1)[1] is None
    assert (ds[1]["label"] == -1).all() and ds[1]["image"].shape == (3, 224, 224)


@pytest.mark.parametrize(("name", "command"), [
    ("cocostuff27", "python -m shared.data.prepare cocostuff"),
    ("cityscapes27", "python -m shared.data.prepare cityscapes"),
    ("potsdam3", "python -m shared.data.prepare potsdam"),
    ("potsdam6", "python -m shared.data.prepare potsdam"),
    ("camvid", "python -m shared.data.prepare camvid"),
])  # fmt: skip
def test_layout_errors_name_the_prepare_command(tmp_path, name, command):
    with pytest.raises(DatasetLayoutError, match=command) as info:
        build_dataset(name, "val", data_root=tmp_path)
    assert str(tmp_path) in str(info.value)


def test_missing_curated_list_and_five_crop_name_their_commands(tmp_path):
    make_coco(tmp_path, {"000000000001": strip([0])}, list_name="other.txt")
    with pytest.raises(DatasetLayoutError, match="Coco164kFull_Stuff_Coarse_7.txt.*--ids-file"):
        build_dataset("cocostuff27", "val", data_root=tmp_path)
    with pytest.raises(DatasetLayoutError, match="prepare five_crop --dataset cocostuff27"):
        build_dataset("cocostuff27", "train", data_root=tmp_path, five_crop=True)


def test_truncated_image_error_and_skip(tmp_path):
    make_folder(tmp_path / "camvid", {f"f{i}": strip([1]) for i in range(3)})
    jpg = tmp_path / "camvid" / "images" / "train" / "f1.jpg"
    jpg.write_bytes(jpg.read_bytes()[:100])
    with pytest.raises(BadSampleError, match="f1.jpg"):
        build_dataset("camvid", "train", data_root=tmp_path)[1]
    with pytest.warns(UserWarning):
        ds = build_dataset("camvid", "train", data_root=tmp_path, on_bad="skip")
    assert len(ds) == 2 and ds.n_skipped == 1


def test_label_size_mismatch_names_both_files(tmp_path):
    make_folder(tmp_path / "camvid", {"a": strip([1])})
    save_image(tmp_path / "camvid" / "labels" / "train" / "a.png", np.zeros((5, 6), np.uint8))
    with pytest.raises(BadSampleError, match=r"a\.png.*a\.jpg"):
        build_dataset("camvid", "train", data_root=tmp_path)[0]


def test_view_is_nearest_aligned_and_normalised(tmp_path):
    # Each pixel's red value encodes its label, so after the view they must still agree pixel for pixel.
    rng = np.random.default_rng(0)
    label = rng.integers(0, 11, size=(30, 50))
    image = np.zeros((30, 50, 3), np.uint8)
    image[..., 0] = label * 20
    save_image(tmp_path / "camvid" / "images" / "train" / "a.png", image)
    save_image(tmp_path / "camvid" / "labels" / "train" / "a.png", label.astype(np.uint8))
    item = build_dataset("camvid", "train", data_root=tmp_path, resolution=16)[0]
    assert item["image"].shape == (3, 16, 16) and item["label"].shape == (16, 16)
    assert item["label"].dtype == torch.long and item["index"] == 0
    red = item["image"][0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    torch.testing.assert_close(red * 255, item["label"].float() * 20, atol=1e-3, rtol=0)
    assert set(item["label"].unique().tolist()) <= set(np.unique(label).tolist())
    green = item["image"][1] * IMAGENET_STD[1] + IMAGENET_MEAN[1]
    torch.testing.assert_close(green, torch.zeros_like(green), atol=1e-5, rtol=0)


def test_view_geometry_by_hand(tmp_path):
    # 4 x 8 label with column index as value; short side 4 -> 2 samples the pixel centres, columns 1, 3, 5, 7;
    # the centre crop of width 2 out of 4 keeps the middle two: 3, 5.
    label = np.tile(np.arange(8), (4, 1))
    make_folder(tmp_path / "f", {"a": label})
    item = build_dataset("folder", "train", data_root=tmp_path / "f", n_classes=8, resolution=2)[0]
    assert item["label"].tolist() == [[3, 5], [3, 5]]


@pytest.mark.parametrize("height, width, resolution", [(480, 640, 224), (360, 480, 322), (1024, 2048, 320),
                                                       (375, 500, 224), (333, 201, 56), (240, 320, 448)])
def test_view_equals_the_original_torchvision_transforms(height, width, resolution):
    # The originals ran T.Resize(res, NEAREST) + T.CenterCrop(res) on PIL images; ours must pick the same pixels.
    from PIL import Image
    from torchvision import transforms as T

    from shared.data.transforms import center_crop, resize_short_side_nearest

    rng = np.random.default_rng(height + width)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    label = rng.integers(-1, 27, size=(height, width))
    original = T.Compose([T.Resize(resolution, T.InterpolationMode.NEAREST), T.CenterCrop(resolution)])
    expected_image = np.asarray(original(Image.fromarray(image)))
    expected_label = np.asarray(original(Image.fromarray((label + 1).astype(np.uint8)))).astype(np.int64) - 1
    assert np.array_equal(center_crop(resize_short_side_nearest(image, resolution), resolution), expected_image)
    assert np.array_equal(center_crop(resize_short_side_nearest(label, resolution), resolution), expected_label)


def test_cache_id_tracks_files_split_resolution_not_root(tmp_path):
    make_folder(tmp_path / "a" / "camvid", {"x": strip([1]), "y": strip([2])})
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    ids = {build_dataset("camvid", "train", data_root=tmp_path / r).cache_id for r in ("a", "b")}
    assert len(ids) == 1  # same files under another root: same id
    base = ids.pop()
    assert build_dataset("camvid", "train", data_root=tmp_path / "a", resolution=32).cache_id != base
    save_image(tmp_path / "b" / "camvid" / "images" / "train" / "z.jpg", rgb(4, 6))
    save_image(tmp_path / "b" / "camvid" / "labels" / "train" / "z.png", strip([0]).astype(np.uint8))
    assert build_dataset("camvid", "train", data_root=tmp_path / "b").cache_id != base


def test_denormalize_inverts_normalize_exactly():
    from shared.data.transforms import denormalize_image, normalize_image

    image = rgb(7, 9, seed=3)
    back = denormalize_image(normalize_image(image))
    assert back.dtype == np.uint8 and back.shape == (7, 9, 3)
    np.testing.assert_array_equal(back, image)
