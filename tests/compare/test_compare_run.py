"""compare.run on the synthetic world of compare_world.py: exact table values, figure grid, failures, backbone checks.

Expected values are worked out by hand from the confusion histograms stats[cluster, class]:
A: [[10, 4, 0], [0, 12, 4], [8, 0, 24]] -> identity matching, 46 of 62 valid pixels right,
   IoU 10/22, 12/20, 24/36. Linear probe classes per image [0, 1, 2, 0] -> 46/62, IoU 18/30, 12/20, 16/28.
B: [[10, 16, 4], [0, 0, 16], [8, 0, 8]] -> clusters 0, 1, 2 -> classes 1, 2, 0, 40 of 62 right,
   IoU 8/26, 16/30, 16/28.
"""

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
from compare_world import ALPHA, CENTRES_A, N_IMAGES, metadata, toy_labels
from PIL import Image

from compare.figure import figure_size
from compare.run import CompareSettings, main, parse_args, run_comparison

ACC_A, MIOU_A = 100 * 46 / 62, 100 * (10 / 22 + 12 / 20 + 24 / 36) / 3
ACC_B, MIOU_B = 100 * 40 / 62, 100 * (8 / 26 + 16 / 30 + 16 / 28) / 3
PANEL = 32
PAD, TITLE = 4, 14  # shared.viz.save_grid's defaults: padding around panels, title strip above each row


def settings(world, runs, **kw) -> CompareSettings:
    kw.setdefault("probe_split", "")  # the evaluator's probe has its own test; here the exported logits are known
    return CompareSettings(dataset="toy", runs=runs, resolution=4, out=str(world.out), cache_dir=str(world.tmp),
                           batch_size=3, device="cpu", figure_rows=4, panel=PANEL, **kw)


def reference_calibration_a() -> tuple[float, float]:
    """ECE (15 bins) and NLL of method A computed directly: every pixel of image i has the softmax of
    ALPHA * cos(e_i, centres); A's matching is the identity."""
    labels = toy_labels().reshape(N_IMAGES, -1)
    conf, correct, nll = [], [], []
    for i in range(N_IMAGES):
        probs = torch.softmax(ALPHA * CENTRES_A[:, i].double(), 0).numpy()
        for y in labels[i][labels[i] >= 0]:
            conf.append(probs.max())
            correct.append(float(probs.argmax() == y))
            nll.append(-math.log(probs[y]))
    conf, correct = np.array(conf), np.array(correct)
    bins = np.clip(np.ceil(conf * 15).astype(int) - 1, 0, 14)  # bins (b/15, (b+1)/15]
    ece = sum(abs(correct[bins == b].mean() - conf[bins == b].mean()) * (bins == b).mean() for b in np.unique(bins))
    return float(ece), float(np.mean(nll))


def test_table_values_match_the_hand_computed_ones(toy_world):
    out = run_comparison(settings(toy_world, [toy_world.runs["a"], toy_world.runs["b"]]))
    data = json.loads(out.paths["json"].read_text())
    a, b = data["results"]
    assert [a["status"], b["status"]] == ["ok", "ok"]
    assert a["unsupervised"]["acc"] == pytest.approx(ACC_A) and a["unsupervised"]["miou"] == pytest.approx(MIOU_A)
    assert a["linear"] is None  # no evaluator probe asked for; the method's own probe is never reported here
    assert b["unsupervised"]["acc"] == pytest.approx(ACC_B) and b["unsupervised"]["miou"] == pytest.approx(MIOU_B)
    assert b["unsupervised"]["mapping"] == [1, 2, 0] and b["linear"] is None
    # Logits are constant over each image, so the CRF cannot change any pixel.
    assert a["crf"]["acc"] == pytest.approx(ACC_A) and b["crf"]["miou"] == pytest.approx(MIOU_B)
    ece, nll = reference_calibration_a()
    assert a["calibration"]["ece"] == pytest.approx(ece, rel=1e-4, abs=1e-6)
    assert a["calibration"]["nll"] == pytest.approx(nll, rel=1e-4)
    assert a["calibration"]["source"] == "cluster-softmax" and b["calibration"]["source"] == "probabilistic"
    assert a["selected_by"] == "last" and a["features"] == {"kind": "tokens", "layer": -1}

    report = out.paths["report"].read_text()
    assert f"| method_a/demo | dinov2_vits14 (UNTRAINED) | {ACC_A:.1f} | {MIOU_A:.1f} | {ACC_A:.1f} | {MIOU_A:.1f} | " \
           "— | — | — |" in report
    assert f"| method_b/demo | dinov2_vits14 (UNTRAINED) | {ACC_B:.1f} | {MIOU_B:.1f} |" in report
    assert "UNTRAINED BACKBONE" in report and "split `val`" in report and "resolution: 4" in report
    rows = list(csv.DictReader(out.paths["csv"].open()))
    assert float(rows[1]["unsupervised_miou"]) == pytest.approx(MIOU_B)


def test_linear_columns_come_from_the_evaluator_probe(toy_world):
    """With --probe-split the linear columns are the evaluator's probe on each method's code, fitted by one recipe:
    A and B export the same code (the features), so their linear scores are identical, whatever A's own probe says.
    On the toy world the probe can learn each image's majority class (e_i -> class), which gives 46/62 pixels right
    at best (image 3 is a tie of 8 and 8)."""
    out = run_comparison(settings(toy_world, [toy_world.runs["a"], toy_world.runs["b"]], probe_split="train",
                                  crf=False))
    a, b = out.results
    assert a.linear == b.linear
    assert a.linear["acc"] == pytest.approx(100 * 46 / 62)
    assert "fitted by the evaluator" in out.paths["report"].read_text()


def test_probe_split_is_read_at_the_probe_resolution(toy_world, monkeypatch):
    """--probe-resolution builds the probe's split at that size (the demo reuses the trainers' 224 px caches) while
    the scored split stays at --resolution; the report names the size the probe was fitted at."""
    import shared.data

    asked = []

    def build_dataset(name, split, **kwargs):
        asked.append((split, kwargs.get("resolution")))
        return toy_world.dataset

    monkeypatch.setattr(shared.data, "build_dataset", build_dataset)
    out = run_comparison(settings(toy_world, [toy_world.runs["a"]], probe_split="train", probe_resolution=8,
                                  crf=False))
    assert asked == [("val", 4), ("train", 8)]
    assert f"(split 'train' at {toy_world.dataset.resolution} px)" in out.header["linear_probe"]
    assert parse_args(["--dataset", "toy", "--runs", "x", "--probe-resolution", "224"]).probe_resolution == 224
    assert parse_args(["--dataset", "toy", "--runs", "x"]).probe_resolution is None


def test_exported_variance_is_the_uncertainty_map(toy_world):
    """B's program exports a variance output; the figure's uncertainty is it, upsampled and divided per image by its
    maximum (part of the export contract, not a fake head)."""
    out = run_comparison(settings(toy_world, [toy_world.runs["b"]], crf=False))
    (b,) = out.results
    features = torch.zeros(N_IMAGES, 4, 2, 2)
    for i in range(N_IMAGES):
        features[i, i] = 1
    variance = 1 + features[:, 3] + torch.arange(2.0).view(1, 1, 2)  # (N, 2, 2), as the toy head defines it
    up = torch.nn.functional.interpolate(variance[:, None], size=(4, 4), mode="bilinear", align_corners=False)[:, 0]
    expected = up / up.flatten(1).amax(1)[:, None, None]
    np.testing.assert_allclose(b.uncertainty, expected.numpy(), rtol=1e-5)


def test_figure_grid_and_matched_colours(toy_world):
    from shared.viz import palette_for

    out = run_comparison(settings(toy_world, [toy_world.runs["a"], toy_world.runs["b"]]))
    image = np.asarray(Image.open(out.paths["figure"]).convert("RGB"))
    # Columns: image, ground truth, A, B, B's uncertainty (B is probabilistic); 4 rows.
    expected = (5 * PANEL + 6 * PAD, 4 * (PANEL + TITLE) + 5 * PAD)
    assert image.shape[1::-1] == figure_size(4, 5, PANEL) == expected
    palette = np.asarray(palette_for("camvid_sample", 3), dtype=np.uint8)
    centre = lambda row, col: image[PAD + row * (PANEL + TITLE + PAD) + TITLE + PANEL // 2,
                                    PAD + col * (PANEL + PAD) + PANEL // 2]
    # Image 0: A predicts cluster 0 -> class 0; B predicts cluster 0, matched to class 1.
    assert tuple(centre(0, 2)) == tuple(palette[0]) and tuple(centre(0, 3)) == tuple(palette[1])
    # Image 2: A cluster 2 -> class 2; B cluster 1 -> class 2: the same class has the same colour.
    assert tuple(centre(2, 2)) == tuple(centre(2, 3)) == tuple(palette[2])


def test_a_failing_method_is_reported_while_the_others_run(toy_world):
    corrupt = toy_world.tmp / "corrupt" / "export"
    shutil.copytree(toy_world.runs["a"], corrupt.parent)
    (corrupt / "segmenter.pt2").write_bytes(b"not a segmenter")
    missing = toy_world.tmp / "never_trained"
    runs = [str(corrupt.parent), toy_world.runs["b"], str(missing)]
    out = run_comparison(settings(toy_world, runs, crf=False))
    statuses = [(r.status, r.error) for r in out.results]
    assert statuses[0][0] == "failed" and statuses[0][1]
    assert statuses[1] == ("ok", "")
    assert statuses[2][0] == "failed" and statuses[2][1].startswith("FileNotFoundError")
    assert out.results[1].unsupervised["acc"] == pytest.approx(ACC_B) and out.results[1].crf is None
    report = out.paths["report"].read_text()
    assert report.count("FAILED") == 2 and "## Failed methods" in report
    assert out.paths["figure"].is_file()


def test_evaluation_errors_become_failed_rows(toy_world, monkeypatch):
    import shared.data

    class ElevenClasses(type(toy_world.dataset)):
        n_classes = 11

    monkeypatch.setattr(shared.data, "build_dataset", lambda *a, **k: ElevenClasses())
    out = run_comparison(settings(toy_world, [toy_world.runs["a"]], crf=False))
    assert out.results[0].status == "failed" and "11" in out.results[0].error


def test_mixed_backbones_are_refused_unless_allowed(toy_world, capsys):

    from compare_world import ToyHead, toy_features

    from shared.segmenter import save

    other = toy_world.tmp / "other.pt2"
    meta = dict(metadata("method_c", 3, False), backbone_weights_id="some-other-weights")
    save(other, ToyHead(CENTRES_A, None, False), torch.from_numpy(toy_features().astype(np.float32)), meta)
    runs = [toy_world.runs["a"], str(other)]
    with pytest.raises(ValueError, match="different backbones"):
        run_comparison(settings(toy_world, runs))
    assert main(["--dataset", "toy", "--runs", " ".join(runs), "--out", str(toy_world.out)]) == 2
    assert "--allow-mixed-backbones" in capsys.readouterr().err
    # Allowed: each group on its own backbone; the fake backbone loads other weights than method_c was trained on.
    out = run_comparison(settings(toy_world, runs, allow_mixed_backbones=True, crf=False))
    assert [r.status for r in out.results] == ["ok", "failed"]
    assert "some-other-weights" in out.results[1].error


def test_runs_naming_one_existing_path_with_spaces_or_commas_is_never_split(tmp_path):
    """`make compare RUNS="my runs/é/stego/camvid_sample/x"` passes the whole value as one --runs argument."""
    spaced = tmp_path / "my runs" / "é" / "stego" / "camvid_sample" / "x"
    comma = tmp_path / "a,b runs" / "kmeans"
    for path in (spaced, comma):
        path.mkdir(parents=True)
    assert parse_args(["--dataset", "toy", "--runs", str(spaced)]).runs == [str(spaced)]
    assert parse_args(["--dataset", "toy", "--runs", f"{comma}\n"]).runs == [str(comma)]
    both = parse_args(["--dataset", "toy", "--runs", f"{spaced}\n{comma}", "--run", str(spaced)]).runs
    assert both == [str(spaced), str(comma), str(spaced)]
    assert parse_args(["--dataset", "toy", "--runs", "runs/x,runs/y"]).runs == ["runs/x", "runs/y"]
