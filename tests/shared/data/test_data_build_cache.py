"""`python -m shared.data.build_cache`: builds (or finds) the caches a trainer opens; under a two-node torchrun
launch on one host it writes the bytes of a single-process build."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import FakeBackbone, make_folder

from shared.data import build_cache, build_dataset
from shared.data.build_cache import main, size_table
from shared.data.feature_cache import FeatureCache

REPO = Path(__file__).resolve().parents[3]
SMALL = ["--backbone", "dinov2_vits14", "--backbone-weights", "none", "--dataset", "camvid_sample",
         "--resolution", "28", "--num-workers", "0", "--device", "cpu", "--batch-size", "4"]


@pytest.fixture(autouse=True)
def no_torchrun_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_builds_then_finds_the_caches_a_trainer_opens(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    make_folder(tmp_path / "camvid", {f"f{i}": rng.integers(0, 12, size=(24, 32)) for i in range(3)})
    calls, backbone = [], FakeBackbone()  # a real ViT costs seconds per batch on 2 busy cores: the slow test has one

    def fake_build(name, weights, *, features, device):
        calls.append((name, weights, features, str(device)))
        return backbone

    monkeypatch.setattr(build_cache, "build_backbone", fake_build)
    args = ["--backbone", "dinov2_vits14", "--backbone-weights", "none", "--dataset", "camvid", "--split", "train",
            "--data-root", str(tmp_path), "--resolution", "16", "--cache-dir", str(tmp_path / "cache"), "--flip",
            "--features", "{kind: keys, blocks: [-2, -1]}", "--num-workers", "0", "--device", "cpu"]
    assert main(args) == 0
    assert calls == [("dinov2_vits14", "none", {"kind": "keys", "blocks": [-2, -1]}, "cpu")]
    out = capsys.readouterr().out
    assert "3 images x 6 x 2x2 x 2 B" in out  # the plan comes before the build
    built = [line.split() for line in out.splitlines() if line.startswith(("built", "found"))]
    dataset = build_dataset("camvid", "train", data_root=tmp_path, resolution=16)
    cache = FeatureCache(tmp_path / "cache")
    assert built == [["built", cache.path_for(backbone, dataset, flip=f).name,
                      str(cache.path_for(backbone, dataset, flip=f))] for f in (False, True)]
    seen = backbone.images_seen
    assert main([*args, "--resolution", "18"]) == 0  # snapped to 16 for patch 8: the same caches
    out = capsys.readouterr().out
    assert "resolution 18 snapped to 16" in out and backbone.images_seen == seen == 6
    assert [line.split()[0] for line in out.splitlines() if line.startswith(("built", "found"))] == ["found", "found"]


def test_bad_descriptor_is_one_line_and_builds_nothing(tmp_path, capsys):
    assert main([*SMALL, "--split", "val", "--cache-dir", str(tmp_path / "c"), "--features", "{kind: values}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("build_cache: error:") and "kind 'values' is unknown" in err and "\n" not in err
    assert not (tmp_path / "c").exists()


def test_readme_shows_the_size_table_the_code_computes():
    assert size_table() in (REPO / "README.md").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # One thread everywhere: the single-process reference and both nodes run the same kernels.
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def two_nodes(module_args: list[str], run_id: str, timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """`torchrun --nnodes 2 --nproc_per_node 1` as two node processes on 127.0.0.1 (c10d rendezvous, gloo)."""
    port = _free_port()
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
              "--max-restarts", "0", *module_args]
    nodes = [subprocess.Popen(launch, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    done = []
    for node in nodes:
        out, err = node.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(launch, node.returncode, out, err))
    return done


@pytest.mark.slow  # two torchrun agents and two workers each import torch: ~1 min on 2 cores
def test_two_node_build_equals_a_single_process_build_byte_for_byte(tmp_path):
    args = [*SMALL, "--split", "train", "val"]
    single = subprocess.run([sys.executable, "-m", "shared.data.build_cache", *args, "--cache-dir",
                             str(tmp_path / "single")], cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    nodes = two_nodes(["-m", "shared.data.build_cache", *args, "--cache-dir", str(tmp_path / "sharded")], "cache")
    for node in nodes:
        assert node.returncode == 0, f"{node.stdout[-2000:]}\n{node.stderr[-4000:]}"
    printed = [line.split() for node in nodes for line in node.stdout.splitlines() if line.startswith("built ")]
    assert len(printed) == 2  # rank 0 alone prints, one line per split
    for _, key, path in printed:
        sharded, reference = Path(path), tmp_path / "single" / key
        assert sorted(p.name for p in sharded.iterdir()) == ["features.f16", "labels.i16", "meta.json"]
        for name in ("features.f16", "labels.i16"):
            assert (sharded / name).read_bytes() == (reference / name).read_bytes(), (key, name)
        assert '"world_size": 2' in (sharded / "meta.json").read_text()
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == sorted(key for _, key, _ in printed)
    assert np.fromfile(Path(printed[0][2]) / "features.f16", dtype=np.float16).std() > 0  # real features
