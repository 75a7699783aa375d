"""End to end: `python -m stego.train --config stego/configs/tiny.yaml` on the bundled sample (random backbone),
the exported segmenter, and resuming."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.backbone import build_backbone
from shared.checkpoint import CheckpointError, load_checkpoint
from shared.config import load_config
from shared.run_start import ResumeMismatchError
from shared.segmenter import load
from stego.config import StegoConfig
from stego.steps import build_modules, eval_head
from stego.train import build_run_data, load_batch, main

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "stego" / "configs" / "tiny.yaml"
# 28 px = 2x2 patches: the smallest grid that exercises everything, to keep the backbone passes cheap.
SMALL = ["resolution=28", "val_resolution=28"]
PINNED_MIOU = 9.58


def _paths(root: Path, cache: Path) -> list[str]:
    return [f"output_root={root / 'runs'}", f"cache_dir={cache}", f"nns_dir={root / 'cache' / 'nns'}"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("stego_e2e")
    # One feature cache for the session: the k-means baseline test builds the same (backbone, split, size) keys.
    cache = tmp_path_factory.getbasetemp() / "uss_feature_cache"
    cmd = [sys.executable, "-m", "stego.train", "--config", str(TINY), *_paths(root, cache), *SMALL]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, cache, root / "runs" / "stego" / "camvid_sample" / "tiny"


def test_tiny_run_writes_the_run_directory(tiny_run):
    *_, run_dir = tiny_run
    for name in ("config.yaml", "metrics.jsonl", "checkpoints/last.pt", "export/segmenter.pt2",
                 "figures/predictions.png", "final_metrics.json"):
        assert (run_dir / name).is_file(), name
    # Choosing a checkpoint by validation mIoU uses labels: not done unless asked for.
    assert not (run_dir / "checkpoints" / "best.pt").exists()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss/total" in r for r in records)
    assert any("val/unsupervised/miou" in r for r in records)
    assert any(r.get("time/step_ms", 0) > 0 for r in records)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["pretrained_backbone"] is False and final["selected_by"] == "last"
    # Deterministic on this platform: random backbone and head from seed 0, two steps (pinned, loose tolerance for
    # other CPUs' float rounding).
    assert final["unsupervised/miou"] == pytest.approx(PINNED_MIOU, abs=0.5)
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 2


def test_final_metrics_equal_what_compare_reports(tiny_run):
    from compare.run import CompareSettings, run_comparison

    root, cache, run_dir = tiny_run
    final = json.loads((run_dir / "final_metrics.json").read_text())
    output = run_comparison(CompareSettings(
        dataset="camvid_sample", runs=[str(run_dir)], resolution=28, backbone_weights="none", out=str(root / "cmp"),
        cache_dir=str(cache), device="cpu", crf=False, probe_split="", figure_rows=1))
    (result,) = output.results
    assert result.status == "ok", result.error
    assert result.unsupervised["miou"] == final["unsupervised/miou"]
    assert result.unsupervised["acc"] == final["unsupervised/acc"]


def test_exported_segmenter_equals_the_trained_head(tiny_run):
    *_, run_dir = tiny_run
    segmenter = load(run_dir / "export" / "segmenter.pt2")
    meta = segmenter.metadata
    assert (meta["method"], meta["backbone"], meta["n_classes"], meta["code_dim"]) == ("stego", "dinov2_vits14", 11, 8)
    assert meta["pretrained_backbone"] is False and meta["selected_by"] == "last"
    assert meta["features"] == {"kind": "tokens", "layer": -1}
    cfg = load_config(StegoConfig, TINY)
    modules = build_modules(cfg, 384, 11)
    modules.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"])
    feats = torch.randn(2, 384, 3, 3)
    with torch.no_grad():
        ours = eval_head(modules, cfg.alpha).eval()(feats)
        theirs = segmenter(feats)
    for key in ("code", "cluster_logits", "linear_logits"):
        torch.testing.assert_close(theirs[key], ours[key], rtol=1e-5, atol=1e-5)


def test_resumed_run_equals_uninterrupted(tiny_run):
    root, cache, _ = tiny_run  # reuses the feature cache and kNN file built by the first run
    common = [*_paths(root, cache), *SMALL, "val_every=2"]
    main(load_config(StegoConfig, TINY, [*common, "name=straight", "max_steps=3"]))
    main(load_config(StegoConfig, TINY, [*common, "name=resumed", "max_steps=2"]))
    main(load_config(StegoConfig, TINY, [*common, "name=resumed", "max_steps=3", "resume=auto"]))
    runs = root / "runs" / "stego" / "camvid_sample"
    straight = load_checkpoint(runs / "straight" / "checkpoints" / "last.pt")
    resumed = load_checkpoint(runs / "resumed" / "checkpoints" / "last.pt")
    assert straight["step"] == resumed["step"] == 3
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def test_resumed_micro_batch_run_equals_uninterrupted(tiny_run):
    """micro_batches=2: the checkpoint holds both virtual ranks' streams, and a resume continues both; a resume with
    another micro_batches (another effective batch) is refused by the run's config check."""
    root, cache, _ = tiny_run
    common = [*_paths(root, cache), *SMALL, "val_every=2", "micro_batches=2", "batch_size=2"]
    main(load_config(StegoConfig, TINY, [*common, "name=micro_straight", "max_steps=3"]))
    main(load_config(StegoConfig, TINY, [*common, "name=micro_resumed", "max_steps=2"]))
    with pytest.raises(ResumeMismatchError, match="micro_batches: 2 in the checkpoint, 1 now"):
        main(load_config(StegoConfig, TINY, [*common, "name=micro_resumed", "max_steps=3", "resume=auto",
                                             "micro_batches=1"]))
    main(load_config(StegoConfig, TINY, [*common, "name=micro_resumed", "max_steps=3", "resume=auto"]))
    runs = root / "runs" / "stego" / "camvid_sample"
    straight = load_checkpoint(runs / "micro_straight" / "checkpoints" / "last.pt")
    resumed = load_checkpoint(runs / "micro_resumed" / "checkpoints" / "last.pt")
    assert straight["step"] == resumed["step"] == 3
    assert len(resumed["rng"]) == 2  # one stream per virtual rank
    assert not torch.equal(resumed["rng"][0]["torch"], resumed["rng"][1]["torch"])
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def test_a_resume_with_another_number_of_ranks_is_refused(tmp_path):
    from stego.rank_streams import check_job_size

    check_job_size([{}, {}, {}, {}], tmp_path / "last.pt", world_size=2, micro_batches=2)
    with pytest.raises(CheckpointError, match=r"job of 4 rank\(s\).*runs 1 process\(es\) x micro_batches=2; "
                                              r"resume with 2 process\(es\)"):
        check_job_size([{}, {}, {}, {}], tmp_path / "last.pt", world_size=1, micro_batches=2)


def test_select_by_val_miou_exports_the_best_validated_head(tiny_run):
    root, cache, _ = tiny_run
    common = [*_paths(root, cache), *SMALL, "val_every=1", "max_steps=3"]
    main(load_config(StegoConfig, TINY, [*common, "name=best", "select_by=val_miou"]))
    run_dir = root / "runs" / "stego" / "camvid_sample" / "best"
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert best["extra"]["best_miou"] == max(
        json.loads(line)["val/unsupervised/miou"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if "val/unsupervised/miou" in line)
    segmenter = load(run_dir / "export" / "segmenter.pt2")
    assert segmenter.metadata["selected_by"] == "val_miou"
    cfg = load_config(StegoConfig, TINY)
    modules = build_modules(cfg, 384, 11)
    modules.load_state_dict(best["model"])
    feats = torch.randn(2, 384, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(segmenter(feats)["code"], eval_head(modules, cfg.alpha).eval()(feats)["code"])


def test_uncached_batches_equal_cached_ones(tiny_run):
    root, cache, _ = tiny_run
    cfg = load_config(StegoConfig, TINY, [*_paths(root, cache), *SMALL])
    backbone = build_backbone(cfg.backbone, "none")
    data = build_run_data(cfg, backbone, print)
    indices = np.array([3, 0, 7])  # unsorted: the cached path reorders its memmap reads
    cached, cached_labels = load_batch(data, backbone, indices, torch.device("cpu"), with_labels=True)
    live, live_labels = load_batch(dataclasses.replace(data, train=None), backbone, indices, torch.device("cpu"),
                                   with_labels=True)
    assert cached.shape == live.shape == (3, 384, 2, 2)
    torch.testing.assert_close(cached, live, rtol=1e-2, atol=1e-2)  # float16 storage
    assert torch.equal(cached_labels, live_labels)


def test_initial_weights_do_not_depend_on_whether_the_caches_existed(tmp_path):
    # Building a feature cache or kNN file iterates a DataLoader, which draws a seed from the global torch RNG; under
    # DDP only rank 0 builds them, so an init drawn after that would differ between ranks (the probes are not DDP).
    common = [f"output_root={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'features'}", f"nns_dir={tmp_path / 'nns'}",
              *SMALL, "max_steps=1", "val_every=1"]
    main(load_config(StegoConfig, TINY, [*common, "name=building"]))  # builds the caches
    main(load_config(StegoConfig, TINY, [*common, "name=reading"]))  # finds them
    runs = tmp_path / "runs" / "stego" / "camvid_sample"
    building = load_checkpoint(runs / "building" / "checkpoints" / "last.pt")["model"]
    reading = load_checkpoint(runs / "reading" / "checkpoints" / "last.pt")["model"]
    for key, value in building.items():
        assert torch.equal(value, reading[key]), key


@pytest.mark.slow
def test_two_rank_resumed_run_equals_uninterrupted(tmp_path):
    """Under torchrun every rank must resume its own dropout and grid stream, and start from the same probes."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    common = [*_paths(tmp_path, tmp_path / "features"), *SMALL, "val_every=2", "device=cpu"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "stego.train",
              "--config", str(TINY), *common]
    for args in (["name=straight", "max_steps=3"], ["name=resumed", "max_steps=2"],
                 ["name=resumed", "max_steps=3", "resume=auto"]):
        done = subprocess.run([*launch, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    runs = tmp_path / "runs" / "stego" / "camvid_sample"
    straight = load_checkpoint(runs / "straight" / "checkpoints" / "last.pt")
    resumed = load_checkpoint(runs / "resumed" / "checkpoints" / "last.pt")
    assert straight["step"] == resumed["step"] == 3
    assert len(resumed["rng"]) == 2  # one stream per rank
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


@pytest.mark.slow  # a two-process torchrun and a single process of the tiny config: about a minute and a half
def test_two_processes_of_two_micro_batches_equal_one_process_of_four(tmp_path):
    """Both are a job of 4 virtual ranks of batch 2: under DDP the first micro-batch's backward runs in `no_sync` and
    the last all-reduces the accumulated gradients. (One process of micro_batches=2 against two plain ranks is
    tests/stego/test_train_two_nodes.py.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    common = ["-m", "stego.train", "--config", str(TINY), *_paths(tmp_path, tmp_path / "features"), *SMALL,
              "device=cpu", "batch_size=2"]
    for launch in ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *common,
                    "name=ddp", "micro_batches=2"], [sys.executable, *common, "name=single", "micro_batches=4"]):
        done = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    runs = tmp_path / "runs" / "stego" / "camvid_sample"
    ddp = load_checkpoint(runs / "ddp" / "checkpoints" / "last.pt")
    single = load_checkpoint(runs / "single" / "checkpoints" / "last.pt")
    assert len(ddp["rng"]) == len(single["rng"]) == 4
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=0, atol=1e-6, msg=key)
