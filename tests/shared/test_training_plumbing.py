"""End to end: the plumbing inside a real (tiny) training loop, tests/shared/tiny_trainer.py.

- 2 gloo ranks under torchrun reach the 1-process weights for the same global batch;
- a crashed run resumed with ``--resume auto`` reaches exactly the uninterrupted run's weights;
- a NaN loss stops the run with a clear message and leaves the last good checkpoint loadable;
- SIGTERM makes the trainer save a checkpoint and exit with 143 (128 + SIGTERM).
Runs without a subprocess are done in-process (fast); torchrun and the signal need real processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sigterm_trainer import sigterm_after_logging

from shared.checkpoint import load_checkpoint, restore_checkpoint
from shared.config import parse_args
from shared.run_guard import NonFiniteLossError
from shared.seed import seed_everything

REPO = Path(__file__).resolve().parents[2]
TRAINER = Path(__file__).with_name("tiny_trainer.py")


def _load_trainer():
    """Import tiny_trainer.py by path (works whatever pytest's import mode and tests/ packaging are)."""
    spec = importlib.util.spec_from_file_location("tiny_trainer", TRAINER)
    module = importlib.util.module_from_spec(spec)
    sys.modules["tiny_trainer"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


tiny = _load_trainer()


@pytest.fixture(autouse=True)
def isolated_global_state(monkeypatch):
    """In-process runs flip global torch switches; put them back so other tests are unaffected."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def run_inprocess(tmp_path: Path, *args: str) -> None:
    tiny.main(parse_args(tiny.TinyConfig, [f"output_root={tmp_path}", *args]))


def final_weights(tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(tmp_path / name / "final.pt")["model"]


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def test_two_gloo_ranks_match_one_process(tmp_path):
    common = ["steps=12", "global_batch=8", "dropout=0"]  # dropout masks would differ per rank
    run_inprocess(tmp_path, "name=single", *common)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TRAINER)]
    cmd += [f"output_root={tmp_path}", "name=ddp", "device=cpu", *common]
    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert load_checkpoint(tmp_path / "single" / "final.pt")["rank_sum"] == 1.0
    assert load_checkpoint(tmp_path / "ddp" / "final.pt")["rank_sum"] == 3.0  # all_reduce_sum over ranks 0 and 1
    single, ddp = final_weights(tmp_path, "single"), final_weights(tmp_path, "ddp")
    assert single.keys() == ddp.keys()
    for key in single:  # float64: only summation order differs between the two runs
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-10, msg=key)
    assert not torch.equal(single["0.weight"], tiny.make_model(tiny.TinyConfig()).state_dict()["0.weight"])
    steps = [json.loads(line)["step"] for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # rank 0 alone writes the log
    assert len(load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")["rng"]) == 2  # one stream per rank


def test_crash_then_resume_auto_equals_uninterrupted_run(tmp_path):
    common = ["steps=11", "save_every=4", "dropout=0.2"]  # dropout: the resumed RNG stream must match too
    run_inprocess(tmp_path, "name=straight", *common)
    with pytest.raises(RuntimeError, match="simulated crash after step 7"):
        run_inprocess(tmp_path, "name=resumed", "crash_after_step=7", *common)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["step"] == 4
    run_inprocess(tmp_path, "name=resumed", "--resume", "auto", *common)  # redoes steps 5..11, crosses an epoch
    straight, resumed = final_weights(tmp_path, "straight"), final_weights(tmp_path, "resumed")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError) as err:
        run_inprocess(tmp_path, "name=nan", "nan_at_step=6", "save_every=4", "steps=10")
    assert "step 6" in str(err.value) and "nan" in str(err.value) and "last good checkpoint is kept" in str(err.value)
    state = load_checkpoint(tmp_path / "nan" / "checkpoints" / "last.pt")
    assert state["step"] == 4
    model = tiny.make_model(tiny.TinyConfig())
    opt = torch.optim.Adam(model.parameters())
    assert restore_checkpoint(state, model=model, optimizers={"main": opt}, method="tiny") == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (tmp_path / "nan" / "final.pt").exists()


def test_sigterm_saves_checkpoint_and_exits(tmp_path):
    metrics = tmp_path / "sig" / "metrics.jsonl"
    cmd = [sys.executable, str(TRAINER), f"output_root={tmp_path}", "name=sig", "steps=1000000", "save_every=1000000"]
    cmd.append("sleep_per_step=0.02")
    code, out, err = sigterm_after_logging(cmd, cwd=REPO, env=subprocess_env(), metrics=metrics, lines=3, timeout_s=120)
    assert code == 128 + signal.SIGTERM, err[-3000:]  # saved, but not finished: a scheduler must see it
    assert "received SIGTERM" in err and err.strip().splitlines()[-1].startswith("stopped at step ")
    state = load_checkpoint(tmp_path / "sig" / "checkpoints" / "last.pt")
    last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert state["step"] == last_logged >= 3
    assert f"stopped by SIGTERM at step {last_logged}" in out
    assert not (tmp_path / "sig" / "final.pt").exists()


def test_seed_everything_repeats_streams_and_sets_determinism():
    seed_everything(123, deterministic=True)
    first = (random.random(), np.random.rand(), torch.rand(2))
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    seed_everything(123)
    second = (random.random(), np.random.rand(), torch.rand(2))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])
    assert not torch.are_deterministic_algorithms_enabled()
    seed_everything(124)
    assert random.random() != first[0]
