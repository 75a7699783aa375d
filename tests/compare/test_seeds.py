"""compare.seeds and the seed/output parts of compare.run: exact statistics against hand computations, grouping only
of runs that differ in nothing but the seed, the figure on the first seed, outputs replaced as one set, run lists
with spaces and non-ASCII characters, and the Makefile's SEEDS loop."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from compare import report
from compare.run import CompareSettings, parse_args, publish_outputs, run_comparison, split_runs
from compare.seeds import group_indices, mean_std, run_recipe, summarize, t_interval

REPO = Path(__file__).resolve().parents[2]
T_975_2 = 4.302652729911275  # t-table: 97.5% quantile, 2 degrees of freedom


# ----------------------------------------------------------------------------------------------- statistics


def _row(method: str, seed: int, miou: float, acc: float = 50.0, status: str = "ok") -> dict:
    return {"method": f"{method}_seed{seed}", "path": f"runs/{method}_seed{seed}", "status": status,
            "unsupervised_miou": miou if status == "ok" else None, "unsupervised_acc": acc, "seed": seed,
            "calibration_source": "cluster-softmax"}


def test_mean_std_and_interval_equal_the_hand_computation():
    mean, std, n = mean_std([40.0, 42.0, 47.0])
    assert (mean, n) == (43.0, 3) and std == pytest.approx(math.sqrt(13.0), rel=1e-12)  # (9 + 1 + 16) / 2
    assert mean_std([5.0]) == (5.0, None, 1)
    # differences 2, 1, 4: mean 7/3, sample variance (1/9 + 16/9 + 25/9) / 2 = 7/3
    mean, low, high = t_interval([2.0, 1.0, 4.0])
    half = T_975_2 * math.sqrt(7 / 3) / math.sqrt(3)
    assert mean == pytest.approx(7 / 3) and low == pytest.approx(7 / 3 - half) and high == pytest.approx(7 / 3 + half)


def test_summary_groups_pairs_and_report_on_synthetic_results():
    rows = [_row("a", 0, 40.0), _row("a", 1, 42.0), _row("a", 2, 47.0),
            _row("b", 0, 38.0), _row("b", 1, 41.0), _row("b", 2, 43.0), _row("c", 0, 10.0)]
    recipes = ["A", "A", "A", "B", "B", "B", "C"]
    summary = summarize(rows, recipes, [r["seed"] for r in rows])
    a, b = summary["groups"]
    assert (a["name"], a["n"], a["seeds"]) == ("a", 3, [0, 1, 2])
    assert a["scores"]["unsupervised_miou"]["mean"] == 43.0
    assert a["scores"]["unsupervised_miou"]["std"] == pytest.approx(math.sqrt(13.0))
    assert b["scores"]["unsupervised_miou"]["mean"] == pytest.approx(122 / 3)
    assert summary["units"] == [[0, 1, 2], [3, 4, 5], [6]]
    pair = next(p for p in summary["paired"] if p["score"] == "unsupervised_miou")
    half = T_975_2 * math.sqrt(7 / 3) / math.sqrt(3)
    assert (pair["a"], pair["b"], pair["n"]) == ("a", "b", 3)
    assert pair["mean_difference"] == pytest.approx(7 / 3) and pair["ci_low"] == pytest.approx(7 / 3 - half)
    acc = next(p for p in summary["paired"] if p["score"] == "unsupervised_acc")
    assert acc["mean_difference"] == 0.0 and acc["ci_low"] == acc["ci_high"] == 0.0
    text = report.render_markdown({"backbones": []}, rows, summary)
    assert "| a | " in text and "| 43.0 ± 3.6 |" in text and "| 3 | 0, 1, 2 | ok |" in text
    interval = f"[{7 / 3 - half:+.2f}, {7 / 3 + half:+.2f}]"
    assert f"| a − b | unsupervised_miou | 0, 1, 2 (n = 3) | +2.33 | {interval} |" in text
    assert "## Per-seed results" in text and "| c_seed0 |" in text
    per_seed = list(csv.DictReader(report.render_csv(rows).splitlines()))
    assert [r["seed"] for r in per_seed] == ["0", "1", "2", "0", "1", "2", "0"]


def test_a_failed_seed_is_left_out_of_the_mean_and_counted():
    rows = [_row("a", 0, 40.0), _row("a", 1, 0.0, status="failed"), _row("a", 2, 44.0)]
    (group,) = summarize(rows, ["A"] * 3, [0, 1, 2])["groups"]
    assert (group["n"], group["n_runs"]) == (2, 3)
    assert group["scores"]["unsupervised_miou"] == {"mean": 42.0, "std": pytest.approx(math.sqrt(8.0)), "n": 2}
    assert "1 of 3 seeds FAILED" in report.grouped_table(rows, summarize(rows, ["A"] * 3, [0, 1, 2]))


# ----------------------------------------------------------------------------------------------- grouping runs


def _run_dir(root: Path, name: str, seed: int, **changes) -> Path:
    run = root / "runs" / "toy" / "toy" / name
    (run / "export").mkdir(parents=True)
    config = {"name": name, "seed": seed, "lr": 0.001, "dataset": "toy", "resume": "", "overwrite": False,
              "git_commit": "abc", "git_dirty": False} | changes
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_only_runs_that_differ_in_seed_and_name_are_grouped(tmp_path):
    meta = {"method": "toy"}
    runs = [_run_dir(tmp_path, "r_seed0", 0), _run_dir(tmp_path, "r_seed1", 1, resume="auto"),
            _run_dir(tmp_path, "r_seed2", 2), _run_dir(tmp_path, "lr_seed1", 1, lr=0.01),
            _run_dir(tmp_path, "commit_seed3", 3, git_commit="def"), _run_dir(tmp_path, "twin", 0)]
    recipes, seeds = zip(*[run_recipe(run, meta) for run in runs], strict=True)
    assert seeds == (0, 1, 2, 1, 3, 0)
    # r_seed0 and twin share seed 0 and the recipe: grouping them would count seed 0 twice, so none is grouped
    assert group_indices(recipes, seeds) == [[0], [1], [2], [3], [4], [5]]
    assert group_indices(recipes[:5], seeds[:5]) == [[0, 1, 2], [3], [4]]
    other_method = run_recipe(runs[1], {"method": "other"})[0]
    assert group_indices([recipes[0], other_method], [0, 1]) == [[0], [1]]
    bare = tmp_path / "bare.pt2"
    assert run_recipe(bare, {"method": "toy", "seed": 4}) == (None, 4)  # no config.yaml: never grouped
    assert run_recipe(runs[0] / "export" / "segmenter.pt2", meta) == run_recipe(runs[0], meta)


# ----------------------------------------------------------------------------------------------- compare end to end


class CosineHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.centres = nn.Parameter(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0.7071, 0.7071]]))

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        inner = torch.einsum("bchw,kc->bkhw", F.normalize(features, dim=1), F.normalize(self.centres, dim=1))
        return {"code": features, "cluster_logits": 10 * inner}


@pytest.fixture(scope="module")
def toy_export(tmp_path_factory) -> Path:
    from compare_world import WEIGHTS_ID

    from shared.segmenter import save

    meta = {"method": "toy", "backbone": "dinov2_vits14", "backbone_weights_id": WEIGHTS_ID,
            "pretrained_backbone": False, "features": {"kind": "tokens", "layer": -1}, "resolution": 4,
            "n_classes": 3, "n_clusters": 3, "code_dim": 4, "dataset": "toy", "probabilistic": False,
            "selected_by": "last"}
    return save(tmp_path_factory.mktemp("export") / "segmenter.pt2", CosineHead(), torch.randn(2, 4, 2, 3), meta)


@pytest.fixture
def seed_world(tmp_path, toy_export, monkeypatch):
    """compare_world's fake dataset, backbone and feature cache; four run directories holding copies of one
    export: seeds 0, 1, 2 of one recipe and seed 0 of another learning rate."""
    from compare_world import ToyBackbone, ToyDataset, cached

    import shared.backbone
    import shared.data
    import shared.data.feature_cache

    class Featurizer(ToyBackbone):
        descriptor = {"kind": "tokens", "layer": -1}

        def with_features(self, features: dict) -> Featurizer:
            return self

    dataset = ToyDataset()
    monkeypatch.setattr(shared.data, "build_dataset", lambda *a, **k: dataset)
    monkeypatch.setattr(shared.backbone, "build_backbone", lambda *a, **k: Featurizer())
    monkeypatch.setattr(shared.data.feature_cache.FeatureCache, "get",
                        lambda self, backbone, ds, *, flip=False, **k: cached(flip))
    runs = []
    for name, seed, changes in [("m_seed0", 0, {}), ("m_seed1", 1, {}), ("m_seed2", 2, {}),
                                ("lr_seed0", 0, {"lr": 0.5})]:
        run = _run_dir(tmp_path, name, seed, **changes)
        shutil.copy(toy_export, run / "export" / "segmenter.pt2")
        runs.append(str(run))
    return tmp_path, runs


def test_compare_groups_seeds_draws_the_first_and_writes_the_outputs_as_a_set(seed_world, monkeypatch):
    import compare.run

    root, runs = seed_world
    shown = []
    real_figure = compare.run.save_comparison_figure
    monkeypatch.setattr(compare.run, "save_comparison_figure",
                        lambda path, ds, labels, idx, results, panel: shown.extend(r.path for r in results) or
                        real_figure(path, ds, labels, idx, results, panel))
    out = root / "out" / "compare"
    settings = CompareSettings(dataset="toy", runs=[runs[2], runs[0], runs[1], runs[3]], out=str(out), crf=False,
                               probe_split="", device="cpu")
    output = run_comparison(settings)
    assert [r.error for r in output.results] == [""] * 4
    (group,) = output.seeds["groups"]
    assert (group["name"], group["seeds"], group["n"]) == ("toy/m", [0, 1, 2], 3)
    assert group["scores"]["unsupervised_miou"]["std"] == 0.0  # the same program under three seeds
    assert shown == [runs[0], runs[3]]  # seed 0 of the group, and the run with another lr
    assert sorted(p.name for p in out.iterdir()) == sorted(compare.run.OUTPUT_FILES)
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["seed"], r["group"]) for r in rows] == [("2", "toy/m"), ("0", "toy/m"), ("1", "toy/m"), ("0", "")]
    assert json.loads((out / "results.json").read_text())["seeds"]["groups"][0]["n"] == 3
    # A second comparison without any successful run has no figure: the old one must not stay beside it.
    run_comparison(CompareSettings(dataset="toy", runs=[str(root / "missing")], out=str(out), crf=False,
                                   probe_split="", device="cpu"))
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "results.csv", "results.json"]


def test_out_with_other_files_is_refused_and_a_failed_build_keeps_the_old_set(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files"):
        run_comparison(CompareSettings(dataset="toy", runs=["x"], out=str(out)))
    (out / "notes.txt").unlink()
    (out / "report.md").write_text("old")

    def broken(folder: Path) -> dict:
        (folder / "report.md").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        publish_outputs(out, broken)
    assert (out / "report.md").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------------------------- run lists


def test_run_lists_with_spaces_commas_newlines_and_non_ascii(tmp_path):
    a, b = tmp_path / "my runs" / "stégo ü", tmp_path / "kmeans"
    a.mkdir(parents=True)
    b.mkdir()
    assert split_runs(f"{a}") == [str(a)]  # an existing path with spaces stays whole
    assert split_runs(f"{a}\n{b}\n") == [str(a), str(b)]
    assert split_runs(f"{a}, {b}") == [str(a), str(b)]
    assert split_runs("runs/x runs/y") == ["runs/x", "runs/y"]  # the older space-separated form
    settings = parse_args(["--dataset", "toy", "--runs", f"{a}\n{b}", "--run", str(a), "--run", "with,comma"])
    assert settings.runs == [str(a), str(b), str(a), "with,comma"]


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys
if sys.argv[1:2] == ["-c"]:
    os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])
with open(os.environ["FAKE_LOG"], "a", encoding="utf-8") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def _make(tmp_path: Path, *args: str) -> list[list[str]]:
    """Run a make target with PY= a stand-in that records its arguments; returns the recorded calls."""
    fake, log = tmp_path / "python", tmp_path / "calls.jsonl"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log.unlink(missing_ok=True)
    env = dict(os.environ, FAKE_LOG=str(log))
    subprocess.run(["make", "-s", "-o", "install", f"PY={fake}", *args], cwd=REPO, env=env, check=True,
                   capture_output=True)
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]


@needs_make
def test_make_train_with_seeds_runs_one_named_run_per_seed(tmp_path):
    calls = _make(tmp_path, "train-kmeans", "DATASET=tiny", "SEEDS=0 2", "ARGS=output_root=/tmp/r")
    config = "baselines/kmeans/configs/tiny.yaml"
    assert calls == [["-m", "baselines.kmeans.train", "--config", config, "output_root=/tmp/r", "seed=0",
                      "name=tiny_seed0"],
                     ["-m", "baselines.kmeans.train", "--config", config, "output_root=/tmp/r", "seed=2",
                      "name=tiny_seed2"]]
    assert _make(tmp_path, "train-kmeans", "DATASET=tiny", "SEEDS=1", "ARGS=name=mine")[0][-1] == "name=mine_seed1"
    assert _make(tmp_path, "train-kmeans", "DATASET=tiny") == [["-m", "baselines.kmeans.train", "--config", config]]


@needs_make
def test_make_compare_passes_paths_with_spaces_and_non_ascii_intact(tmp_path):
    runs = "runs/stego/my run ü\nruns/kmeans/\"quoted\" run"
    (call,) = _make(tmp_path, "compare", f"RUNS={runs}")
    assert call[call.index("--runs") + 1] == runs
    (call,) = _make(tmp_path, "predict", "SEGMENTER=runs/a b", "IMAGES=my photos/é", "OUT=out dir")
    assert call[call.index("--images") + 1] == "my photos/é" and call[call.index("--out") + 1] == "out dir"


def test_demo_seeds_trains_every_method_once_per_seed(tmp_path, monkeypatch):
    import compare.demo as demo

    calls = []
    monkeypatch.setattr(demo.subprocess, "run", lambda argv, **k: calls.append(argv) or
                        subprocess.CompletedProcess(argv, 1))
    runs = demo.train_methods(tmp_path, "none", "random-seed0", str(tmp_path / "cache"), True, 56,
                              methods=["stego", "kmeans"], seeds=2)
    assert [Path(r).name for r in runs] == ["demo_fast_seed0", "demo_fast_seed0", "demo_fast_seed1",
                                            "demo_fast_seed1"]
    assert [(a[a.index("--config") - 1], next(x for x in a if x.startswith("seed="))) for a in calls] == [
        ("stego.train", "seed=0"), ("baselines.kmeans.train", "seed=0"), ("stego.train", "seed=1"),
        ("baselines.kmeans.train", "seed=1")]
    calls.clear()
    one = demo.train_methods(tmp_path, "none", "random-seed0", str(tmp_path / "cache"), True, 56, methods=["stego"])
    assert Path(one[0]).name == "demo_fast" and not any(x.startswith("seed=") for x in calls[0])
