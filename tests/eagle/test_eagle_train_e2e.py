"""End to end: `eagle/configs/tiny.yaml` on the bundled sample (random backbone) trains, exports a program whose
metadata names the keys descriptor, and (slow) resumes to the same weights as an uninterrupted run."""

import json
from pathlib import Path

import pytest
import torch

from eagle.config import EagleConfig
from eagle.steps import build_modules, eval_head
from eagle.train import main
from shared.checkpoint import load_checkpoint
from shared.config import load_config
from shared.segmenter import load

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "eagle" / "configs" / "tiny.yaml"
SMALL = ["resolution=42", "val_resolution=42"]  # 3x3 patches: the cheapest grid with a non-trivial spectrum


def _common(root: Path, cache: Path) -> list[str]:
    return [f"output_root={root / 'runs'}", f"cache_dir={cache}", *SMALL]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle_e2e")
    cache = tmp_path_factory.getbasetemp() / "uss_feature_cache"
    finished = main(load_config(EagleConfig, TINY, _common(root, cache)))
    return root, cache, finished


def test_tiny_run_trains_and_exports(tiny_run):
    root, _, finished = tiny_run
    run_dir = root / "runs" / "eagle" / "camvid_sample" / "tiny"
    for name in ("config.yaml", "metrics.jsonl", "checkpoints/last.pt", "export/segmenter.pt2",
                 "figures/predictions.png", "final_metrics.json"):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*records)
    for key in ("train/loss/eigen", "train/loss/obj", "train/loss/correspondence", "time/step_ms"):
        assert key in logged, key
    segmenter = load(finished.export_path)
    meta = segmenter.metadata
    assert meta["method"] == "eagle" and meta["features"] == {"kind": "keys", "blocks": [-3, -2, -1]}
    assert (meta["feature_dim"], meta["n_classes"], meta["n_clusters"], meta["code_dim"]) == (3 * 384, 11, 12, 8)
    # The export equals the checkpointed modules on random features of another size.
    cfg = load_config(EagleConfig, TINY)
    modules = build_modules(cfg, 3 * 384, 11)
    modules.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"])
    feats = torch.randn(2, 3 * 384, 5, 7)
    with torch.no_grad():
        ours, theirs = eval_head(modules, cfg.alpha).eval()(feats), segmenter(feats)
    for key in ("code", "cluster_logits", "linear_logits"):
        torch.testing.assert_close(theirs[key], ours[key], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted(tiny_run):
    root, cache, _ = tiny_run
    common = _common(root, cache)
    main(load_config(EagleConfig, TINY, [*common, "name=straight", "max_steps=2"]))
    main(load_config(EagleConfig, TINY, [*common, "name=resumed", "max_steps=1"]))
    main(load_config(EagleConfig, TINY, [*common, "name=resumed", "max_steps=2", "resume=auto"]))
    runs = root / "runs" / "eagle" / "camvid_sample"
    straight = load_checkpoint(runs / "straight" / "checkpoints" / "last.pt")
    resumed = load_checkpoint(runs / "resumed" / "checkpoints" / "last.pt")
    assert straight["step"] == resumed["step"] == 2
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
