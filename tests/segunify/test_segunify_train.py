"""SegUnify end to end on the bundled sample (random backbone, 28 px): the run directory, the export, resuming, and
the one-sentence errors for settings the data cannot support."""

import json
from pathlib import Path

import pytest
import torch

from segunify.config import SegUnifyConfig
from segunify.train import check_settings, main
from shared.checkpoint import load_checkpoint
from shared.config import load_config
from shared.segmenter import load

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "segunify" / "configs" / "tiny.yaml"
SMALL = ["resolution=28", "val_resolution=28"]  # 2x2 patches: the cheapest grid that exercises everything


def _config(root: Path, cache: Path, *extra: str) -> SegUnifyConfig:
    return load_config(SegUnifyConfig, TINY, [f"output_root={root / 'runs'}", f"cache_dir={cache}",
                                              f"nns_dir={root / 'nns'}", *SMALL, *extra])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("segunify_e2e")
    cache = tmp_path_factory.getbasetemp() / "uss_feature_cache"  # shared with the other methods' e2e tests
    finished = main(_config(root, cache))
    return root, cache, finished


def test_tiny_run_writes_the_run_directory_and_an_export(tiny_run):
    root, _, finished = tiny_run
    run_dir = root / "runs" / "segunify" / "camvid_sample" / "tiny"
    for name in ("config.yaml", "metrics.jsonl", "checkpoints/last.pt", "export/segmenter.pt2",
                 "figures/predictions.png", "final_metrics.json"):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss/agreement" in r for r in records) and any("time/step_ms" in r for r in records)
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 2
    segmenter = load(finished.export_path)
    meta = segmenter.metadata
    assert (meta["method"], meta["n_clusters"], meta["code_dim"], meta["selected_by"]) == ("segunify", 11, 8, "last")
    features = torch.randn(2, meta["feature_dim"], 5, 7)
    with torch.no_grad():
        ours, theirs = finished.head(features), segmenter(features)
    assert set(theirs) == {"code", "cluster_logits", "linear_logits"}
    for key in theirs:
        torch.testing.assert_close(theirs[key], ours[key], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted(tiny_run):
    root, cache, _ = tiny_run
    main(_config(root, cache, "name=straight", "max_steps=3"))
    main(_config(root, cache, "name=resumed", "max_steps=2"))
    resumed = main(_config(root, cache, "name=resumed", "max_steps=3", "resume=auto"))
    runs = root / "runs" / "segunify" / "camvid_sample"
    straight = load_checkpoint(runs / "straight" / "checkpoints" / "last.pt")["model"]
    again = load_checkpoint(runs / "resumed" / "checkpoints" / "last.pt")["model"]
    for key, value in straight.items():  # global centres and batch-norm statistics included
        assert torch.equal(value, again[key]), key
    assert "labeler.global_centres" in straight and "compressor.linear_branch.1.running_mean" in straight
    assert resumed.export_path.is_file()


def test_too_many_clusters_for_the_tokens_of_a_tiny_run(tiny_run):
    root, cache, _ = tiny_run
    # 4 images x 2x2 patches = 16 tokens per batch, 11 classes + 20 extra clusters.
    with pytest.raises(ValueError, match=r"31 clusters but a batch holds only 16 tokens .* raise resolution"):
        main(_config(root, cache, "name=crowded", "n_extra_clusters=20"))


def test_fewer_images_than_clusters_and_other_bad_settings():
    cfg = SegUnifyConfig(batch_size=16)
    with pytest.raises(ValueError, match="has 8 images, fewer than the 11 clusters"):
        check_settings(cfg, 8, (16, 16), 11)
    check_settings(cfg, 40, (2, 2), 11)  # 16 images x 4 tokens = 64 >= 11: fine
    with pytest.raises(ValueError, match="27 clusters but a batch holds only 16 tokens"):
        check_settings(SegUnifyConfig(batch_size=4), 40, (2, 2), 27)
