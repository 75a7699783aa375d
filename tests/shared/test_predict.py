"""shared.predict and shared.sliding_window: images of any size and mode come back at their own size, the sliding
windows average to a brute-force reference, re-runs skip finished images, failures and bad input are reported."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from shared.data.transforms import normalize_image
from shared.predict import PredictOptions, build_predictor, image_outputs, main, predict
from shared.segmenter import save
from shared.sliding_window import argmax_channels, resized_size, upsample_rows, window_starts

C, D, K, N_CLASSES, RES, PATCH = 384, 4, 3, 2, 28, 14  # ViT-S/14 tokens; windows of 2 x 2 patches


class ToyHead(nn.Module):
    """Per-cell code and cosine clusters, a variance, and a 3x3 smoothing (a spatial head, so windows matter)."""

    def __init__(self, smoothed: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.project = nn.Conv2d(C, D, 1)
        self.centres = nn.Parameter(torch.randn(K, D))
        self.smoothed = smoothed

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        code = self.project(features)
        logits = 5 * torch.einsum("bdhw,kd->bkhw", F.normalize(code, dim=1), F.normalize(self.centres, dim=1))
        out = {"code": code, "cluster_logits": logits, "variance": code.pow(2).mean(1)}
        if self.smoothed:
            out["smoothed_logits"] = F.avg_pool2d(logits, 3, stride=1, padding=1, count_include_pad=False)
        return out


def _metadata(**changes) -> dict:
    meta = {"method": "toy", "backbone": "dinov2_vits14", "backbone_weights_id": "random-seed0",
            "pretrained_backbone": False, "features": {"kind": "tokens", "layer": -1}, "resolution": RES,
            "n_classes": N_CLASSES, "n_clusters": K, "code_dim": D, "dataset": "camvid_sample",
            "probabilistic": True, "selected_by": "last"}
    return meta | changes


@pytest.fixture(scope="module")
def segmenter_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("run") / "export" / "segmenter.pt2"
    save(path, ToyHead(), torch.randn(2, C, 3, 4, generator=torch.Generator().manual_seed(1)), _metadata())
    return path


@pytest.fixture(scope="module")
def random_backbone():
    from shared.backbone import build_backbone

    return build_backbone("dinov2_vits14", "none")


@pytest.fixture(autouse=True)
def reuse_backbone(random_backbone, monkeypatch):
    """Every run here builds the same random ViT-S/14 (seconds on 2 busy cores): build it once. Other weights
    (the tests of unavailable weights) go to the real builder."""
    import shared.backbone

    real = shared.backbone.build_backbone
    monkeypatch.setattr(shared.backbone, "build_backbone",
                        lambda name, weights=None, **kw: random_backbone if weights == "none" else real(
                            name, weights, **kw))


@pytest.fixture(scope="module")
def predictor(segmenter_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("unused")
    return build_predictor(PredictOptions(segmenter=str(segmenter_path), images=str(out), out=str(out / "o"),
                                          device="cpu"))


def _rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _single_pass(predictor, rgb: np.ndarray) -> dict[str, torch.Tensor]:
    """The head on the backbone's features of one normalised R x R image: (C, R/p, R/p) per key."""
    with torch.no_grad():
        out = predictor.segmenter(predictor.backbone(normalize_image(rgb)[None]))
    return {key: value[0] for key, value in out.items()}


# ----------------------------------------------------------------------------------------------- window geometry


def test_window_starts_hand_examples():
    assert window_starts(28, 28, 14) == [0]
    assert window_starts(56, 28, 14) == [0, 14, 28]  # stride: 28 * 2/3 -> 14
    assert window_starts(434, 322, 14) == [0, 112]  # stride 210; the last window ends at 434
    assert window_starts(100, 40, 10, overlap=0.0) == [0, 40, 60]
    with pytest.raises(ValueError):
        window_starts(50, 28, 14)  # not on the patch grid


def test_resized_size_short_side_to_resolution_long_side_on_the_patch_grid():
    assert resized_size(240, 320, 322, 14) == (322, 434)  # 429.3 -> 31 patches
    assert resized_size(320, 240, 322, 14) == (434, 322)
    assert resized_size(7, 10, 28, 14) == (28, 42)  # smaller than one window: upscaled
    assert resized_size(20, 600, 28, 14) == (28, 840)


def test_upsample_rows_equals_interpolate_and_its_chunked_argmax():
    values = torch.randn(5, 3, 7, generator=torch.Generator().manual_seed(0))
    reference = F.interpolate(values[None], size=(50, 33), mode="bilinear", align_corners=False)[0]
    for max_floats in (10**6, 100):  # one call, and row chunks of 4
        torch.testing.assert_close(upsample_rows(values, (50, 33), chunk=4, max_floats=max_floats), reference,
                                   rtol=1e-5, atol=1e-5)
        ids = upsample_rows(values, (50, 33), reduce=argmax_channels, chunk=4, max_floats=max_floats)
        assert ids.shape == (50, 33)
        assert (ids == reference.argmax(0)).float().mean() > 0.99  # ties at ulp level may differ


# ----------------------------------------------------------------------------------------------- sliding windows


def test_one_window_image_equals_the_single_pass(predictor):
    rgb = _rgb(RES, RES)
    ours = image_outputs(predictor, rgb)
    reference = _single_pass(predictor, rgb)
    torch.testing.assert_close(ours["cluster_logits"], reference["cluster_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["variance"][0], reference["variance"], rtol=1e-5, atol=1e-5)


def test_overlapping_windows_average_per_cell_against_brute_force(predictor):
    rgb = _rgb(RES, 2 * RES, seed=1)  # resized as is: windows at 0, 14, 28 px over a (2, 4) feature grid
    ours = image_outputs(predictor, rgb)["cluster_logits"]
    sums, counts = torch.zeros(K, 2, 4), torch.zeros(2, 4)
    for left in (0, 14, 28):
        single = _single_pass(predictor, rgb[:, left: left + RES])["cluster_logits"]
        sums[:, :, left // PATCH: left // PATCH + 2] += single
        counts[:, left // PATCH: left // PATCH + 2] += 1
    assert counts.tolist() == [[1, 2, 2, 1], [1, 2, 2, 1]]
    torch.testing.assert_close(ours, sums / counts, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- whole runs


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(path)


def _rows(out: Path) -> dict[str, dict]:
    with (out / "index.csv").open() as f:
        return {row["file"]: row for row in csv.DictReader(f)}


def test_odd_sizes_and_modes_give_outputs_of_the_input_size(segmenter_path, tmp_path, capsys):
    images = tmp_path / "images"
    cases = {"tiny.png": ((7, 10), None), "wide.jpg": ((20, 600), None), "gray.png": ((33, 45), "L"),
             "rgba.png": ((50, 40), "RGBA"), "sub/tall.png": ((90, 30), None)}
    for name, ((h, w), mode) in cases.items():
        _save(images / name, _rgb(h, w, seed=h), mode)
    out = tmp_path / "out"
    assert main(["--segmenter", str(segmenter_path.parent.parent), "--images", str(images), "--out", str(out),
                 "--device", "cpu", "--batch-size", "3"]) == 0
    assert "random backbone weights, as the segmenter was trained" in capsys.readouterr().err
    rows = _rows(out)
    for name, ((h, w), _) in cases.items():
        stem = str(Path(name).with_suffix(""))
        for kind in ("labels", "overlay", "variance"):
            assert Image.open(out / kind / f"{stem}.png").size == (w, h), (name, kind)
        labels = np.asarray(Image.open(out / "labels" / f"{stem}.png"))
        assert labels.max() < K
        assert rows[name]["status"] == "ok" and (int(rows[name]["width"]), int(rows[name]["height"])) == (w, h)
        assert float(rows[name]["mean_variance"]) > 0


def test_labels_are_the_argmax_of_the_upsampled_logits(predictor, tmp_path):
    rgb = _rgb(RES, RES, seed=3)
    _save(tmp_path / "images" / "a.png", rgb)
    predict(PredictOptions(segmenter="", images=str(tmp_path / "images"), out=str(tmp_path / "out")), predictor)
    logits = _single_pass(predictor, rgb)["cluster_logits"]
    expected = F.interpolate(logits[None], size=(RES, RES), mode="bilinear", align_corners=False)[0].argmax(0)
    assert (np.asarray(Image.open(tmp_path / "out" / "labels" / "a.png")) == expected.numpy()).all()


def test_rerun_skips_done_images_and_overwrite_redoes_them(segmenter_path, tmp_path, capsys):
    images, out = tmp_path / "images", tmp_path / "out"
    for name in ("a.png", "b.png"):
        _save(images / name, _rgb(30, 40))
    args = ["--segmenter", str(segmenter_path), "--images", str(images), "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    marker = out / "labels" / "a.png"
    marker.write_bytes(b"not touched")
    seconds = _rows(out)["a.png"]["seconds"]
    capsys.readouterr()
    assert main(args) == 0
    assert marker.read_bytes() == b"not touched" and "2 skipped" in capsys.readouterr().out
    assert _rows(out)["a.png"]["seconds"] == seconds  # the earlier row is kept
    (out / "overlay" / "b.png").unlink()  # an image with a missing output is redone
    assert main(args) == 0
    assert "1 images segmented, 1 skipped" in capsys.readouterr().out
    assert main(args + ["--overwrite"]) == 0
    assert Image.open(marker).size == (40, 30)


def test_unreadable_image_is_reported_and_the_rest_continue(segmenter_path, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    _save(images / "good.png", _rgb(30, 40))
    (images / "broken.jpg").write_bytes(b"\xff\xd8 this is no jpeg")
    _save(images / "z_good.png", _rgb(30, 40))
    assert main(["--segmenter", str(segmenter_path), "--images", str(images), "--out", str(out)]) == 1
    rows = _rows(out)
    assert rows["broken.jpg"]["status"] == "failed" and "UnidentifiedImageError" in rows["broken.jpg"]["error"]
    assert rows["good.png"]["status"] == rows["z_good.png"]["status"] == "ok"
    assert not (out / "labels" / "broken.png").exists()


def test_mapping_gives_class_ids_and_255_for_unmatched_clusters(segmenter_path, tmp_path):
    mapping = [1, -1, 0]
    results = {"header": {"dataset": "camvid_sample", "n_classes": N_CLASSES},
               "results": [{"path": str(segmenter_path.parent.parent), "unsupervised": {"mapping": mapping}}]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    rgb = _rgb(RES, 3 * RES, seed=5)
    _save(tmp_path / "images" / "a.png", rgb)
    common = ["--segmenter", str(segmenter_path), "--images", str(tmp_path / "images")]
    assert main(common + ["--out", str(tmp_path / "clusters")]) == 0
    assert main(common + ["--out", str(tmp_path / "classes"), "--mapping", str(tmp_path / "results.json")]) == 0
    clusters = np.asarray(Image.open(tmp_path / "clusters" / "labels" / "a.png"))
    classes = np.asarray(Image.open(tmp_path / "classes" / "labels" / "a.png"))
    assert (classes == np.array([1, 255, 0])[clusters]).all()


@pytest.mark.parametrize("post", ["smooth", "crf"])
def test_post_processing_runs_and_keeps_the_size(segmenter_path, tmp_path, post):
    _save(tmp_path / "images" / "a.jpg", _rgb(45, 70))
    assert main(["--segmenter", str(segmenter_path), "--images", str(tmp_path / "images"),
                 "--out", str(tmp_path / "out"), "--post", post]) == 0
    assert Image.open(tmp_path / "out" / "labels" / "a.png").size == (70, 45)


# ----------------------------------------------------------------------------------------------- bad input


def _bad(args: list[str], capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_bad_input_is_one_sentence_and_writes_nothing(segmenter_path, tmp_path, capsys, monkeypatch):
    empty, out = tmp_path / "empty", tmp_path / "out"
    empty.mkdir()
    (empty / "notes.txt").write_text("no image here")
    base = ["--segmenter", str(segmenter_path), "--out", str(out)]
    assert "holds no images" in _bad(base + ["--images", str(empty)], capsys)
    images = tmp_path / "images"
    _save(images / "a.png", _rgb(30, 40))
    (tmp_path / "file").write_text("x")
    assert "is a file" in _bad(["--segmenter", str(segmenter_path), "--images", str(images),
                                "--out", str(tmp_path / "file")], capsys)
    other = {"header": {"dataset": "cocostuff27", "n_classes": 27}, "results": []}
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert "cocostuff27" in _bad(base + ["--images", str(images), "--mapping", str(tmp_path / "other.json")], capsys)
    missing = tmp_path / "weights" / "dinov2_vits14.pth"
    assert str(missing) in _bad(base + ["--images", str(images), "--backbone-weights", str(missing)], capsys)
    assert not out.exists()


def test_unavailable_official_weights_name_the_file(tmp_path, capsys, monkeypatch):
    path = tmp_path / "segmenter.pt2"
    save(path, ToyHead(smoothed=False), torch.randn(2, C, 3, 4), _metadata(backbone_weights_id="abc123",
                                                                             pretrained_backbone=True))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("DINO_WEIGHTS_BASE_URL", "http://127.0.0.1:9")  # refused at once: no download
    _save(tmp_path / "images" / "a.png", _rgb(30, 40))
    args = ["--segmenter", str(path), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "out")]
    assert "dinov2_vits14_pretrain.pth" in _bad(args, capsys)
    assert "smoothed_logits" in _bad(args + ["--post", "smooth", "--backbone-weights", "none"], capsys)
    assert not (tmp_path / "out").exists()
