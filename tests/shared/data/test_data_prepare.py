"""Preparation CLIs on tiny synthetic archives and images in the official formats."""

from __future__ import annotations

import io
import shutil
import sys
import types
import zipfile

import numpy as np
import pytest
import scipy.io
from data_fixtures import FakeBackbone, make_folder, rgb
from PIL import Image

from shared.data import build_dataset
from shared.data.prepare.__main__ import main
from shared.data.prepare.common import PrepareError


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def write_zip(path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_prepare_cocostuff_from_official_archives(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    fine = np.array([[0, 2, 255], [156, 177, 15]], np.uint8).repeat(4, 0).repeat(4, 1)  # (8, 12)
    ids = ["000000000139", "000000000285"]
    write_zip(src / "val2017.zip", {f"val2017/{i}.jpg": png_bytes(rgb(8, 12), "JPEG") for i in ids})
    write_zip(src / "stuffthingmaps_trainval2017.zip",
              {**{f"val2017/{i}.png": png_bytes(fine) for i in ids}, "train2017/000000000009.png": png_bytes(fine)})
    (tmp_path / "ids.txt").write_text("139\n")
    main(["cocostuff", "--src", str(src), "--dst", str(tmp_path / "data"), "--splits", "val2017",
          "--ids-file", str(tmp_path / "ids.txt"), "--ids-split", "val2017"])
    ds = build_dataset("cocostuff27", "val", data_root=tmp_path / "data")
    assert len(ds) == 1 and ds.image_path(0).name == "000000000139.jpg"
    _, label = ds.load_raw(0)
    assert label[0, ::4].tolist() == [9, 11, -1] and label[4, ::4].tolist() == [23, 26, 7]
    assert not (tmp_path / "data" / "cocostuff" / "annotations" / "train2017").exists()
    with pytest.raises(PrepareError, match="train2017.zip"):
        main(["cocostuff", "--src", str(src), "--dst", str(tmp_path / "data"), "--splits", "train2017"])


def test_prepare_cityscapes_extracts_images_and_label_ids_only(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ids = np.full((6, 8), 26, np.uint8)
    stem = "val/lindau/lindau_000000_000019"
    write_zip(src / "leftImg8bit_trainvaltest.zip", {"README": b"x", f"leftImg8bit/{stem}_leftImg8bit.png":
                                                     png_bytes(rgb(6, 8))})
    write_zip(src / "gtFine_trainvaltest.zip", {f"gtFine/{stem}_gtFine_labelIds.png": png_bytes(ids),
                                                f"gtFine/{stem}_gtFine_color.png": png_bytes(rgb(6, 8))})
    main(["cityscapes", "--src", str(src), "--dst", str(tmp_path / "data")])
    ds = build_dataset("cityscapes27", "val", data_root=tmp_path / "data")
    assert len(ds) == 1 and (ds.load_raw(0)[1] == 19).all()  # car: id 26 - 7
    assert not list((tmp_path / "data").rglob("*_color.png"))


def test_prepare_potsdam_tiles_colour_code_and_splits(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    colours = [(255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0), (9, 9, 9)]
    label = np.zeros((16, 17, 3), np.uint8)
    for j, colour in enumerate(colours):
        label[:, j] = colour
    for image_id in ("2_10", "2_11"):
        rgbir = np.random.default_rng(0).integers(0, 256, (16, 17, 4), dtype=np.uint8)
        Image.fromarray(rgbir, "RGBA").save(src / f"top_potsdam_{image_id}_RGBIR.tif")
        Image.fromarray(label).save(src / f"top_potsdam_{image_id}_label.tif")
    Image.fromarray(rgb(16, 17)).save(src / "top_potsdam_3_10_RGB.png")  # no label: unlabelled_train
    main(["potsdam", "--src", str(src), "--dst", str(tmp_path / "data"), "--tile", "8", "--test-ids", "2_11"])
    root = tmp_path / "data" / "potsdam"
    # 16 x 17 pixels in 8 x 8 tiles: 2 x 2 tiles per image, the partial last column dropped.
    assert (root / "labelled_train.txt").read_text().split() == ["2_10_000_000", "2_10_000_001", "2_10_001_000",
                                                                 "2_10_001_001"]
    assert [t[:4] for t in (root / "labelled_test.txt").read_text().split()] == ["2_11"] * 4
    assert [t[:4] for t in (root / "unlabelled_train.txt").read_text().split()] == ["3_10"] * 4
    assert len((root / "all.txt").read_text().split()) == 12
    ds6 = build_dataset("potsdam6", "train", data_root=tmp_path / "data")
    assert ds6.load_raw(0)[1][0].tolist() == [0, 1, 2, 3, 4, 5, -1, -1]  # (9,9,9) and black are no class
    ds3 = build_dataset("potsdam3", "val", data_root=tmp_path / "data")
    assert ds3.load_raw(0)[1][0].tolist() == [0, 1, 2, 2, 0, 1, -1, -1]
    assert not build_dataset("potsdam3", "unlabelled_train", data_root=tmp_path / "data").has_labels


def test_prepare_five_crop_corners_and_centre(tmp_path):
    label = np.arange(10 * 12).reshape(10, 12) % 11
    make_folder(tmp_path / "camvid", {"a": label, "b": label[::-1]})
    main(["five_crop", "--dataset", "camvid", "--split", "train", "--src", str(tmp_path)])
    ds = build_dataset("camvid", "train", data_root=tmp_path, five_crop=True, resolution=4)
    assert len(ds) == 10 and ds.n_classes == 11 and ds.cache_id.startswith("camvid-train-five-r4-")
    windows = [np.s_[0:5, 0:6], np.s_[0:5, 6:12], np.s_[5:10, 0:6], np.s_[5:10, 6:12], np.s_[2:7, 3:9]]
    for i, source in enumerate((label, label[::-1])):
        for k, window in enumerate(windows):
            image, crop = ds.load_raw(5 * i + k)
            assert image.size == (6, 5)
            np.testing.assert_array_equal(crop, source[window])
    path = tmp_path / "cropped" / "camvid_five_crop_0.5" / "label" / "train" / "7.png"
    assert np.asarray(Image.open(path)).min() >= 1  # stored as id + 1


def test_prepare_camvid_from_segnet_layout(tmp_path):
    src = tmp_path / "CamVid"
    for split in ("train", "val"):
        (src / split).mkdir(parents=True)
        (src / f"{split}annot").mkdir()
        Image.fromarray(rgb(6, 8)).save(src / split / "0001TP_006690.png")
        Image.fromarray(np.full((6, 8), 11, np.uint8)).save(src / f"{split}annot" / "0001TP_006690.png")
    main(["camvid", "--src", str(src), "--dst", str(tmp_path / "data"), "--splits", "train", "val"])
    ds = build_dataset("camvid", "val", data_root=tmp_path / "data")
    assert len(ds) == 1 and (ds.load_raw(0)[1] == -1).all()


def test_prepare_knn_writes_the_nns_file(tmp_path, monkeypatch):
    fake = types.ModuleType("shared.backbone")
    fake.build_backbone = lambda name, weights=None, *, layer=-1, device="cpu": FakeBackbone(layer=layer)
    monkeypatch.setitem(sys.modules, "shared.backbone", fake)
    rng = np.random.default_rng(0)
    make_folder(tmp_path / "camvid", {f"f{i}": rng.integers(0, 11, (16, 16)) for i in range(6)})
    main(["knn", "--dataset", "camvid", "--split", "train", "--src", str(tmp_path), "--dst", str(tmp_path / "nns"),
          "--backbone", "fake_vit", "--weights", "none", "--k", "3", "--resolution", "16"])
    with np.load(tmp_path / "nns" / "nns_fake_vit_camvid_train_center_16.npz") as data:
        assert data["nns"].shape == (6, 3) and data["nns"][:, 0].tolist() == list(range(6))


# ----------------------------------------------------------------------------- a rerun replaces the split whole
# Each source writer makes version 1 or 2 of a tiny source (version 2 drops an image, changes one and adds one) and
# returns the command line for a destination.


def camvid_source(root, version):
    src = root / "CamVid"
    shutil.rmtree(src, ignore_errors=True)
    for split in ("train", "val"):
        (src / split).mkdir(parents=True)
        (src / f"{split}annot").mkdir()
        for i, stem in enumerate(["a", "b"] if version == 1 else ["a", "c"]):
            Image.fromarray(rgb(6, 8, seed=10 * version + i)).save(src / split / f"{stem}.png")
            Image.fromarray(np.full((6, 8), version + i, np.uint8)).save(src / f"{split}annot" / f"{stem}.png")
    return lambda dst: ["camvid", "--src", str(src), "--dst", str(dst), "--splits", "train", "val"]


def cityscapes_source(root, version):
    src = root / "src"
    src.mkdir(exist_ok=True)
    stems = ["lindau_000000_000019", "lindau_000001_000019"] if version == 1 else ["lindau_000002_000019"]
    write_zip(src / "leftImg8bit_trainvaltest.zip", {f"leftImg8bit/val/lindau/{s}_leftImg8bit.png":
                                                     png_bytes(rgb(6, 8, seed=version)) for s in stems})
    write_zip(src / "gtFine_trainvaltest.zip", {f"gtFine/val/lindau/{s}_gtFine_labelIds.png":
                                                png_bytes(np.full((6, 8), 26, np.uint8)) for s in stems})
    return lambda dst: ["cityscapes", "--src", str(src), "--dst", str(dst), "--splits", "val"]


def cocostuff_source(root, version):
    src = root / "src"
    src.mkdir(exist_ok=True)
    ids = ["000000000139", "000000000285"] if version == 1 else ["000000000139", "000000000632"]
    write_zip(src / "val2017.zip", {f"val2017/{i}.jpg": png_bytes(rgb(8, 12, seed=version), "JPEG") for i in ids})
    write_zip(src / "stuffthingmaps_trainval2017.zip",
              {f"val2017/{i}.png": png_bytes(np.full((8, 12), version, np.uint8)) for i in ids})
    return lambda dst: ["cocostuff", "--src", str(src), "--dst", str(dst), "--splits", "val2017"]


def potsdam_source(root, version):
    src = root / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    label = np.zeros((16, 16, 3), np.uint8)
    label[:, :8] = (0, 0, 255)
    for i, image_id in enumerate(["2_10", "2_11"] if version == 1 else ["2_10"]):
        rgbir = np.random.default_rng(10 * version + i).integers(0, 256, (16, 16, 4), dtype=np.uint8)
        Image.fromarray(rgbir, "RGBA").save(src / f"top_potsdam_{image_id}_RGBIR.tif")
        Image.fromarray(label).save(src / f"top_potsdam_{image_id}_label.tif")
    return lambda dst: ["potsdam", "--src", str(src), "--dst", str(dst), "--tile", "8", "--test-ids", "2_11"]


def five_crop_source(root, version):
    data = root / "five_crop_data"
    shutil.rmtree(data, ignore_errors=True)
    label = np.arange(10 * 12).reshape(10, 12) % 11
    make_folder(data / "camvid", {"a": label, "b": label[::-1]} if version == 1 else {"a": label[:, ::-1]})
    return lambda dst: ["five_crop", "--dataset", "camvid", "--split", "train", "--src", str(data), "--dst", str(dst)]


SOURCES = {"camvid": camvid_source, "cityscapes": cityscapes_source, "cocostuff": cocostuff_source,
           "potsdam": potsdam_source, "five_crop": five_crop_source}


def tree(root) -> dict[str, bytes]:
    """Every file under `root` (hidden ones too) -> its content; .mat files by their arrays (the header has a date)."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.suffix == ".mat":
            data = b"".join(v.tobytes() for k, v in sorted(scipy.io.loadmat(path).items()) if not k.startswith("__"))
        files[str(path.relative_to(root))] = data
    return files


@pytest.mark.parametrize("command", list(SOURCES))
def test_a_rerun_replaces_each_split_as_a_whole(tmp_path, command):
    main(SOURCES[command](tmp_path, 1)(tmp_path / "data"))
    first = tree(tmp_path / "data")
    for folder in {(tmp_path / "data" / name).parent for name in first if not name.endswith(".txt")}:
        (folder / "stale.png").write_bytes(b"left over")  # e.g. a file a user dropped there
    main(SOURCES[command](tmp_path, 2)(tmp_path / "data"))
    main(SOURCES[command](tmp_path, 2)(tmp_path / "fresh"))
    rerun = tree(tmp_path / "data")
    assert rerun == tree(tmp_path / "fresh") and rerun != first
    assert not any("stale" in name or ".partial" in name or ".old" in name for name in rerun)


def test_a_failed_rerun_keeps_the_previous_split(tmp_path):
    def val_files():
        return {k: v for k, v in tree(tmp_path / "data").items() if k.split("/")[2] in ("val", ".val.partial")}

    main(camvid_source(tmp_path, 1)(tmp_path / "data"))
    before = val_files()
    argv = camvid_source(tmp_path, 2)(tmp_path / "data")  # a.png changes, then c.png lacks its label
    (tmp_path / "CamVid" / "valannot" / "c.png").unlink()
    with pytest.raises(PrepareError, match="c.png is missing"):
        main(argv)
    assert val_files() == before  # neither the new a.png nor a partial folder


def test_a_source_inside_a_replaced_folder_is_refused(tmp_path):
    inside = tmp_path / "data" / "cocostuff" / "images" / "val2017"
    argv = cocostuff_source(tmp_path, 1)(tmp_path / "data")
    inside.mkdir(parents=True)
    for archive in (tmp_path / "src").iterdir():
        shutil.move(archive, inside / archive.name)
    argv[argv.index("--src") + 1] = str(inside)
    with pytest.raises(PrepareError, match="lies inside .*val2017, which this command replaces"):
        main(argv)
    assert sorted(p.name for p in inside.iterdir()) == ["stuffthingmaps_trainval2017.zip", "val2017.zip"]
