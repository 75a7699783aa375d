"""End to end on the bundled sample (random backbone): a tiny STEGO run as the base, then the tiny PU-SegNet run;
the export, the calibration block, the pseudo-label cache and the bad-input errors."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pusegnet.config import PusegnetConfig
from pusegnet.pseudo_labels import _open, cache_path, file_sha256, load_or_compute
from pusegnet.train import main
from shared.config import load_config
from shared.run_dir import RunDirError
from shared.segmenter import load

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "pusegnet" / "configs" / "tiny.yaml"
SMALL = ["resolution=28", "val_resolution=28"]  # 2x2 patches: the cheapest grid that exercises everything


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pusegnet_e2e")
    cache = tmp_path_factory.getbasetemp() / "uss_feature_cache"
    common = [f"output_root={root / 'runs'}", f"cache_dir={cache}", *SMALL, "device=cpu"]
    stego = [sys.executable, "-m", "stego.train", "--config", str(REPO / "stego/configs/tiny.yaml"), *common,
             f"nns_dir={root / 'nns'}"]
    done = subprocess.run(stego, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    finished = main(load_config(PusegnetConfig, TINY, common))
    return root, cache, common, finished


def test_tiny_run_exports_variance_and_smoothed_logits(runs):
    root, _, _, finished = runs
    run_dir = root / "runs" / "pusegnet" / "camvid_sample" / "tiny"
    segmenter = load(run_dir / "export" / "segmenter.pt2")
    assert segmenter.metadata["probabilistic"] is True and segmenter.metadata["base_method"] == "stego"
    feats = torch.randn(2, 384, 5, 7)
    with torch.no_grad():
        out, ref = segmenter(feats), finished.head(feats)
    assert out["variance"].shape == (2, 5, 7) and out["smoothed_logits"].shape == (2, 11, 5, 7)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-5)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    for key in ("calibration/pusegnet/ece", "calibration/base/ece", "uncertainty/pusegnet/auroc", "smoothed/miou"):
        assert key in final
    block = json.loads((run_dir / "calibration.json").read_text())
    counts = block["calibration"]["pusegnet"]["bins"]["count"]
    assert sum(counts) == block["calibration"]["pusegnet"]["n_pixels"] > 0
    for name in ("predictions.png", "reliability.png", "rejection.png"):
        assert (run_dir / "figures" / name).is_file()


def test_pseudo_label_cache_is_keyed_validated_and_rebuilt(runs):
    root, cache, common, _ = runs
    base_path = root / "runs" / "stego" / "camvid_sample" / "tiny" / "export" / "segmenter.pt2"
    files = list((cache.parent / "pseudo_labels").glob("*.npz"))
    assert len(files) == 1 and file_sha256(base_path)[:16] in files[0].name
    from shared.backbone import build_backbone
    from shared.data import build_dataset
    from shared.data.feature_cache import FeatureCache

    backbone = build_backbone("dinov2_vits14", "none")
    train = FeatureCache(cache).get(backbone, build_dataset("camvid_sample", "train", resolution=28), progress=False)
    base = load(base_path)
    path = cache_path(files[0].parent, train.key, file_sha256(base_path))
    assert path == files[0]
    with torch.no_grad():  # the cached labels are the base's argmax on the cached features
        probs = torch.softmax(base(torch.from_numpy(np.asarray(train.features[:3], dtype=np.float32)))
                              ["cluster_logits"], 1)
    labels = np.load(path)["labels"]
    assert np.array_equal(labels[:3], probs.argmax(1).numpy())
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # damage the file
    path.write_bytes(bytes(data))
    n, _, h, w = train.features.shape
    assert _open(path, (n, h, w), {}) is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rebuilt = load_or_compute(base, base_path, train, path.parent)
    assert any("rebuilding" in str(w.message) for w in caught)
    assert np.array_equal(rebuilt.labels, labels)


def test_bad_base_segmenters_are_one_sentence_errors(runs, tmp_path):
    root, _, common, _ = runs
    with pytest.raises(RunDirError, match="no exported segmenter"):
        main(load_config(PusegnetConfig, TINY, [*common, f"base_segmenter={tmp_path / 'missing.pt2'}", "name=a"]))
    junk = tmp_path / "junk.pt2"
    junk.write_text("not a program")
    with pytest.raises(RunDirError, match="not an exported program"):
        main(load_config(PusegnetConfig, TINY, [*common, f"base_segmenter={junk}", "name=b"]))
    base = root / "runs" / "stego" / "camvid_sample" / "tiny"
    with pytest.raises(RunDirError, match="trained on dinov2_vits14"):
        main(load_config(PusegnetConfig, TINY, [*common, f"base_segmenter={base}", "backbone=dino_vits16",
                                                "name=c"]))
