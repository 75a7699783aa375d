"""STEGO's tiny config under a two-node torchrun launch on one host (c10d rendezvous, gloo) reaches the weights of the
same job launched as two processes of one node; its feature caches are built sharded across the two nodes.

A single process is not the reference: STEGO's dropout masks and sample grids are drawn per rank (seed + rank), so
two ranks of batch 2 do not draw what one process of batch 4 draws. What a multi-node launch must not change is the
result of the same two-rank job, and that is what is checked."""

from __future__ import annotations

import importlib
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


@pytest.mark.slow  # two torchrun agents, two trainers and a single-process reference: minutes on 2 cores
@pytest.mark.skipif(NOT_IMPORTABLE is not None, reason=str(NOT_IMPORTABLE))
def test_two_node_training_matches_one_process(tmp_path):
    common = ["--config", str(TINY), f"output_root={tmp_path / 'runs'}", f"nns_dir={tmp_path / 'nns'}",
              "resolution=28", "val_resolution=28", "device=cpu", "max_steps=2", "val_every=2"]
    single = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "stego.train", *common, "name=single", "batch_size=2",
                             f"cache_dir={tmp_path / 'cache_single'}"], cwd=REPO, env=_env(), capture_output=True,
                            text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "stego",
              "--max-restarts", "0", "-m", "stego.train", *common, "name=nodes", "batch_size=2",
              f"cache_dir={tmp_path / 'cache_nodes'}"]
    nodes = [subprocess.Popen(launch, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for node in nodes:
        out, err = node.communicate(timeout=900)
        assert node.returncode == 0, f"{out[-2000:]}\n{err[-4000:]}"
    runs = tmp_path / "runs" / "stego" / "camvid_sample"
    one = load_checkpoint(runs / "single" / "checkpoints" / "last.pt")["model"]
    two = load_checkpoint(runs / "nodes" / "checkpoints" / "last.pt")["model"]
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-6, msg=key)
