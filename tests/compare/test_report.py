"""compare.report: table formatting, untrained-backbone labelling, failed rows, atomic files."""

import csv
import json

from compare import report

HEADER = {"dataset": "toy", "split": "val", "n_images": 2, "n_classes": 2, "resolution": 4, "extra_policy": "error",
          "crf": True, "batch_size": 2, "device": "cpu",
          "backbones": [{"name": "dinov2_vits14", "layer": -1, "weights_id": "random-seed0", "pretrained": False,
                         "images_per_s": 3.0}]}
OK = {"method": "stego/demo", "path": "runs/stego", "status": "ok", "backbone": "dinov2_vits14",
      "backbone_weights_id": "random-seed0", "pretrained_backbone": False, "probabilistic": False,
      "unsupervised": {"acc": 62.5, "miou": 45.0}, "crf": {"acc": 70.0, "miou": 50.25}, "linear": None,
      "calibration": {"ece": 0.1234, "nll": 1.5, "source": "cluster-softmax"}, "images_per_s": 1234.5,
      "peak_memory_mib": 3.25, "selected_by": "last"}
FAILED = {"method": "kmeans/demo", "path": "runs/kmeans", "status": "failed", "error": "ValueError: bad file"}


def test_table_row_values_and_failed_row():
    table = report.markdown_table([OK, FAILED]).splitlines()
    assert table[0].startswith("| method | backbone | unsup. Acc | unsup. mIoU | +CRF Acc | +CRF mIoU | +own post mIoU "
                               "| linear Acc")
    assert table[2] == ("| stego/demo | dinov2_vits14 (UNTRAINED) | 62.5 | 45.0 | 70.0 | 50.2 | — | — | — | 0.123† | "
                        "1.500† | 1234 | 3.2 | last | ok |")
    assert table[3].endswith("| FAILED: ValueError: bad file |")
    assert table[3].count("—") == 11


def test_untrained_backbone_is_labelled_loudly_and_pretrained_is_not():
    text = report.render_markdown(HEADER, [OK])
    assert text.count("UNTRAINED BACKBONE") == 2  # above and below the table
    assert "random-seed0" in text and "UNTRAINED: random weights" in text
    pretrained = dict(HEADER, backbones=[dict(HEADER["backbones"][0], pretrained=True, weights_id="abc")])
    assert "UNTRAINED" not in report.render_markdown(pretrained, [dict(OK, pretrained_backbone=True)])


def test_files_are_written_and_parse(tmp_path):
    paths = report.write_reports(tmp_path, HEADER, [OK, FAILED])
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert float(rows[0]["unsupervised_acc"]) == 62.5 and rows[1]["unsupervised_acc"] == ""
    data = json.loads(paths["json"].read_text())
    assert data["header"]["dataset"] == "toy" and data["results"][1]["error"] == "ValueError: bad file"
    assert "## Failed methods" in paths["report"].read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "results.csv", "results.json"]  # no temp left
