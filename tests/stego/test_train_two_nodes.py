"""STEGO's tiny config under a two-node torchrun launch on one host (c10d rendezvous, gloo) equals one process with
`micro_batches=2`: the same weights (within 1e-6), and the feature caches it builds sharded across the two nodes are
byte for byte the caches one process builds.

One process of batch 4 would not be the reference: STEGO draws its dropout masks and sample grids per rank (seed +
rank), its kNN partners per (seed, rank, step), its batch indices from each rank's share of the split, and pairs
negatives within each rank's batch. `micro_batches=2 batch_size=2` runs the two ranks as virtual ranks of one
process (`stego.rank_streams`), each with what a real rank draws, and averages their gradients as DDP does."""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "stego" / "configs" / "tiny.yaml"


def _trainer_importable() -> str | None:
    try:
        importlib.import_module("stego.train")
    except ImportError as err:
        return f"stego.train does not import on this branch ({err})"
    return None


NOT_IMPORTABLE = _trainer_importable()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# meta.json fields that time the build or say how it was split (a sharded build records its world size); everything
# else in it, and every other file, must be the same bytes.
BUILD_RECORD = {"build_seconds", "images_per_s", "created", "publish_seconds", "world_size"}


def _cache_files(cache_dir: Path) -> dict[str, object]:
    """{path relative to cache_dir: bytes, or meta.json without BUILD_RECORD} of every file of every cache."""
    files = {}
    for path in sorted(p for p in cache_dir.rglob("*") if p.is_file()):
        name = str(path.relative_to(cache_dir))
        if path.name == "meta.json":
            files[name] = {k: v for k, v in json.loads(path.read_text()).items() if k not in BUILD_RECORD}
        else:
            files[name] = path.read_bytes()
    return files


@pytest.mark.slow  # two torchrun agents, two trainers and a single-process reference: minutes on 2 cores
@pytest.mark.skipif(NOT_IMPORTABLE is not None, reason=str(NOT_IMPORTABLE))
def test_two_node_training_matches_one_process(tmp_path):
    common = ["--config", str(TINY), f"output_root={tmp_path / 'runs'}", "resolution=28", "val_resolution=28",
              "device=cpu", "max_steps=2", "val_every=2", "batch_size=2"]
    single = subprocess.run([sys.executable, "-m", "stego.train", *common, "name=single", "micro_batches=2",
                             f"cache_dir={tmp_path / 'cache_single'}", f"nns_dir={tmp_path / 'nns_single'}"],
                            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "stego",
              "--max-restarts", "0", "-m", "stego.train", *common, "name=nodes",
              f"cache_dir={tmp_path / 'cache_nodes'}", f"nns_dir={tmp_path / 'nns_nodes'}"]
    nodes = [subprocess.Popen(launch, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for node in nodes:
        out, err = node.communicate(timeout=900)
        assert node.returncode == 0, f"{out[-2000:]}\n{err[-4000:]}"

    one_cache, two_cache = _cache_files(tmp_path / "cache_single"), _cache_files(tmp_path / "cache_nodes")
    assert sum(name.endswith("meta.json") for name in one_cache) == 3  # train view, validation view and its flip
    assert one_cache.keys() == two_cache.keys()
    for name in one_cache:
        assert two_cache[name] == one_cache[name], name
    for name in (name for name in two_cache if name.endswith("meta.json")):  # really built sharded, and not read
        assert json.loads((tmp_path / "cache_nodes" / name).read_text())["world_size"] == 2, name

    runs = tmp_path / "runs" / "stego" / "camvid_sample"
    one = load_checkpoint(runs / "single" / "checkpoints" / "last.pt")
    two = load_checkpoint(runs / "nodes" / "checkpoints" / "last.pt")
    assert len(one["rng"]) == len(two["rng"]) == 2  # one stream per (virtual) rank
    assert one["model"].keys() == two["model"].keys()
    for key in one["model"]:
        torch.testing.assert_close(two["model"][key], one["model"][key], rtol=0, atol=1e-6, msg=key)
