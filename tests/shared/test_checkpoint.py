"""shared.checkpoint: atomic writes survive interruption, clear load errors, exact state round trips."""

from __future__ import annotations

import os
import random
import signal
import sys

import numpy as np
import pytest
import torch
from torch import nn

from shared import checkpoint as ckpt
from shared.checkpoint import (
    CheckpointError,
    load_checkpoint,
    make_checkpoint,
    resolve_resume,
    restore_checkpoint,
    save_checkpoint,
    unwrap_model,
)
from shared.dist import distributed


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def trained(model: nn.Module) -> torch.optim.Optimizer:
    """Two Adam steps, so the optimizer has non-trivial state (exp_avg, step)."""
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.ones(5, 3)).square().mean().backward()
        opt.step()
    return opt


def partial_then_fail(obj, f, *args, **kwargs):
    """Stand-in for torch.save that dies half-way: writes the start of a zip archive, then raises."""
    f.write(b"PK\x03\x04" + b"\0" * 100)
    f.flush()
    raise OSError("disk full (simulated)")


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"step": 1, "w": torch.arange(4.0)}, path)
    monkeypatch.setattr(torch, "save", partial_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2, "w": torch.zeros(4)}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(4.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # the temp file was removed


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_process_killed_mid_write_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)
    pid = os.fork()
    if pid == 0:  # child: start writing step 2, then die by SIGKILL half-way (no cleanup can run)
        try:

            def write_then_die(obj, f, *args, **kwargs):
                f.write(b"PK\x03\x04partial")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)

            torch.save = write_then_die
            save_checkpoint({"step": 2}, path)
        finally:
            os._exit(3)  # never reached when SIGKILL lands; guarantees the child never returns to pytest
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert load_checkpoint(path)["step"] == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.pt"]
    assert all(name.startswith(".last.pt.") and name.endswith(".tmp") for name in leftovers)


def test_truncated_file_error_names_path(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"w": torch.randn(100)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        load_checkpoint(path)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.pt")):
        load_checkpoint(tmp_path / "nope.pt")
    text = tmp_path / "notes.pt"
    text.write_text("hello, not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint file"):
        load_checkpoint(text)
    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.ones(2), tensor_only)
    with pytest.raises(CheckpointError, match="holds a Tensor, not a checkpoint dict"):
        load_checkpoint(tensor_only)


def test_a_crafted_file_runs_nothing_and_the_error_names_it(crafted_file):
    """A file whose unpickling would run code (in any of the pickle formats torch.load reads) is refused unrun."""
    crafted = crafted_file("last.pt", {"format_version": ckpt.FORMAT_VERSION, "step": 3})
    with pytest.raises(CheckpointError, match="weights_only=True refuses") as err:
        load_checkpoint(crafted.path)
    message = str(err.value)
    assert str(crafted.path) in message and ("getattr" in message or "eval" in message) and "\n" not in message
    assert not crafted.marker.exists()


def test_resolve_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert resolve_resume("", run) is None and resolve_resume("none", run) is None and resolve_resume(None, run) is None
    assert resolve_resume("auto", run) is None
    assert "no checkpoint" in capsys.readouterr().out
    last = save_checkpoint({"step": 1}, run / "checkpoints" / "last.pt")
    assert resolve_resume("auto", run) == last
    assert resolve_resume(str(last), tmp_path / "other") == last
    assert resolve_resume(str(run), tmp_path / "other") == last  # a run directory means its last.pt
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        resolve_resume(str(tmp_path / "missing.pt"), run)


class FakeScaler:
    def __init__(self, scale: float) -> None:
        self.scale = scale

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": 3}

    def load_state_dict(self, state: dict) -> None:
        self.scale = state["scale"]


def test_make_restore_round_trip_with_ddp_and_rng(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    model = small_model()
    opt = trained(model)
    with distributed("cpu"):
        wrapped = nn.parallel.DistributedDataParallel(model)
        random.seed(1), np.random.seed(1), torch.manual_seed(1)
        state = make_checkpoint(
            model=wrapped, optimizers={"main": opt}, step=7, config={"lr": 0.1}, method="toy",
            scaler=FakeScaler(1024.0), extra={"best_miou": 12.5},
        )  # fmt: skip
        path = save_checkpoint(state, tmp_path / "last.pt")
        expected_draws = (random.random(), float(np.random.rand()), torch.rand(3))
    loaded = load_checkpoint(path)
    assert set(loaded) == {
        "format_version", "method", "step", "model", "optimizers", "scaler", "config", "git_commit", "extra", "rng",
    }  # fmt: skip
    assert not any(k.startswith("module.") for k in loaded["model"])

    fresh = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    scaler = FakeScaler(1.0)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    step = restore_checkpoint(loaded, model=fresh, optimizers={"main": fresh_opt}, scaler=scaler, method="toy")
    assert step == 7 and scaler.scale == 1024.0 and loaded["extra"] == {"best_miou": 12.5}
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], fresh_opt.state_dict()["state"][0]["exp_avg"])
    draws = (random.random(), float(np.random.rand()), torch.rand(3))
    assert draws[0] == expected_draws[0] and draws[1] == expected_draws[1] and torch.equal(draws[2], expected_draws[2])


def test_restore_checks_method_version_shapes_and_optimizers():
    model = small_model()
    opt = trained(model)
    state = make_checkpoint(model=model, optimizers={"main": opt}, step=1, config={}, method="stego")
    with pytest.raises(CheckpointError, match="written by method 'stego' but is being restored into 'eagle'"):
        restore_checkpoint(state, model=model, optimizers={"main": opt}, method="eagle")
    with pytest.raises(CheckpointError, match="format_version is 99"):
        restore_checkpoint({**state, "format_version": 99}, model=model, optimizers={"main": opt})
    with pytest.raises(CheckpointError, match="no 'format_version' key"):
        restore_checkpoint({"model": state["model"]}, model=model, optimizers={"main": opt})
    other = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(CheckpointError, match="do not match the model"):
        restore_checkpoint(state, model=other, optimizers={})
    with pytest.raises(CheckpointError, match=r"optimizers \['main'\] but the trainer has \['head'\]"):
        restore_checkpoint(state, model=model, optimizers={"head": opt})


def test_unwrap_model_strips_wrappers():
    model = small_model()
    assert unwrap_model(nn.DataParallel(model)) is model
    assert unwrap_model(model) is model


def test_rng_state_is_weights_only_loadable(tmp_path):
    path = save_checkpoint({"rng": [ckpt.rng_state()]}, tmp_path / "rng.pt")
    state = torch.load(path, weights_only=True)["rng"][0]
    a = (random.random(), np.random.rand(), torch.rand(1))
    ckpt.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(1))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])



def test_gather_rng_states_takes_a_process_s_entries_for_several_ranks():
    assert len(ckpt.gather_rng_states()) == 1
    entries = [ckpt.rng_state(), {**ckpt.rng_state(), "torch": torch.manual_seed(7).get_state()}]
    gathered = ckpt.gather_rng_states(entries)  # one process: its entries, in order
    assert len(gathered) == 2 and all(a is b for a, b in zip(gathered, entries, strict=True))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
