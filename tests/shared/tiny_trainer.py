"""A tiny trainer that exercises the shared plumbing end to end; the plumbing tests run it as a subprocess.

A float64 MLP regresses a fixed synthetic dataset with Adam. It has the shape of every real trainer:
``parse_args`` -> ``distributed()`` -> seed -> DDP model -> DistributedSampler with ``set_epoch`` ->
``resolve_resume`` / ``restore_checkpoint`` -> loop with ``check_finite`` and ``StopSignal`` -> atomic
``last.pt`` every ``save_every`` steps -> ``final.pt`` (the unwrapped model's weights).

    python tests/shared/tiny_trainer.py output_root=/tmp/runs steps=20
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/shared/tiny_trainer.py ...

Test hooks: ``crash_after_step`` (raise without saving, like a killed job), ``nan_at_step`` (poison the
loss), ``sleep_per_step`` (keep the run alive long enough to be signalled).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from shared.checkpoint import (  # noqa: E402
    gather_rng_states,
    last_checkpoint_path,
    load_checkpoint,
    make_checkpoint,
    resolve_resume,
    restore_checkpoint,
    save_checkpoint,
)
from shared.cli import run_trainer  # noqa: E402
from shared.config import save_resolved_config  # noqa: E402
from shared.dist import (  # noqa: E402
    DistContext,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_object,
    distributed,
)
from shared.logger import RunLogger  # noqa: E402
from shared.run_guard import StopSignal, check_finite  # noqa: E402
from shared.seed import seed_everything  # noqa: E402

METHOD = "tiny"


@dataclass
class TinyConfig:
    name: str = "tiny"
    output_root: str = "runs"
    seed: int = 0
    deterministic: bool = True
    resume: str = ""
    device: str = "cpu"
    data_root: str = ""
    steps: int = 24
    global_batch: int = 8  # split evenly over ranks
    n_samples: int = 64
    in_dim: int = 4
    hidden: int = 8
    lr: float = 0.02
    dropout: float = 0.1  # uses the torch RNG, so resume must restore it
    save_every: int = 4
    crash_after_step: int = -1
    nan_at_step: int = -1
    sleep_per_step: float = 0.0


def make_dataset(cfg: TinyConfig) -> TensorDataset:
    """Fixed synthetic regression data ``x (N, D) -> y (N, 1)``, independent of the global RNG."""
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(cfg.n_samples, cfg.in_dim, generator=gen, dtype=torch.float64)
    w = torch.randn(cfg.in_dim, 1, generator=gen, dtype=torch.float64)
    y = torch.sin(x @ w) + 0.1 * torch.randn(cfg.n_samples, 1, generator=gen, dtype=torch.float64)
    return TensorDataset(x, y)


def make_model(cfg: TinyConfig) -> nn.Module:
    return nn.Sequential(
        nn.Linear(cfg.in_dim, cfg.hidden), nn.Tanh(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, 1)
    ).double()


def batches(loader: DataLoader, sampler: DistributedSampler, start_step: int):
    """Endless ``(epoch-aware)`` batches, skipping the ``start_step`` batches a resumed run already used."""
    per_epoch = len(loader)
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch)  # a different, reproducible shuffle each epoch
        yield from itertools.islice(loader, skip, None)
        epoch, skip = epoch + 1, 0


def train(cfg: TinyConfig, ctx: DistContext, stop: StopSignal) -> None:
    """The run itself; a function so the DDP model is released before ``distributed()`` tears down the group."""
    run_dir = Path(cfg.output_root) / cfg.name
    if cfg.global_batch % ctx.world_size:
        raise ValueError(f"global_batch={cfg.global_batch} must be divisible by {ctx.world_size} ranks.")
    seed_everything(cfg.seed, cfg.deterministic)  # same seed on every rank: identical initial weights
    model = make_model(cfg).to(ctx.device)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=cfg.lr)
    data = make_dataset(cfg)
    sampler = DistributedSampler(data, ctx.world_size, ctx.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    # Each new DataLoader iterator draws a seed from its `generator`; without one it would consume the global
    # torch RNG at a different point in a resumed run (which starts an iterator mid-epoch) and break exactness.
    loader_rng = torch.Generator().manual_seed(cfg.seed)
    per_rank = cfg.global_batch // ctx.world_size
    loader = DataLoader(data, batch_size=per_rank, sampler=sampler, drop_last=True, generator=loader_rng)
    if ctx.is_main:
        save_resolved_config(cfg, run_dir)
    log = RunLogger(run_dir, enabled=ctx.is_main)
    step = 0
    ckpt = resolve_resume(cfg.resume, run_dir)
    if ckpt is not None:
        step = restore_checkpoint(load_checkpoint(ckpt), model=ddp, optimizers={"main": opt}, method=METHOD)
        log.write(f"resumed from {ckpt} at step {step}")

    def save() -> None:
        rng = gather_rng_states()  # collective: every rank takes part
        if ctx.is_main:
            state = make_checkpoint(model=ddp, optimizers={"main": opt}, step=step, config=cfg, method=METHOD, rng=rng)
            save_checkpoint(state, last_checkpoint_path(run_dir))

    ddp.train()
    stream = batches(loader, sampler, step)
    while step < cfg.steps:
        x, y = next(stream)
        loss = nn.functional.mse_loss(ddp(x.to(ctx.device)), y.to(ctx.device))  # mean over the rank's batch
        if step + 1 == cfg.nan_at_step:
            loss = loss * float("nan")
        check_finite(loss, step + 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages gradients over ranks: the gradient of the global-batch mean
        opt.step()
        step += 1
        log.scalars(step, {"loss": all_reduce_mean(loss.detach().clone()).item()}, prefix="train")  # global mean
        if step == cfg.crash_after_step:
            raise RuntimeError(f"simulated crash after step {step}")
        if step % cfg.save_every == 0:
            save()
        time.sleep(cfg.sleep_per_step)
        if stop.sync():
            save()
            log.write(f"stopped by {stop.signal_name or 'signal'} at step {step}; checkpoint saved")
            log.close()
            raise stop.interrupted(step)  # the run did not finish: run_cli exits 128 + signal
    # The collective helpers in a real job: rank r contributes r + 1; rank 0's object reaches every rank.
    rank_sum = all_reduce_sum(torch.tensor([ctx.rank + 1.0])).item()
    if broadcast_object({"from": ctx.rank})["from"] != 0:
        raise RuntimeError(f"broadcast_object did not deliver rank 0's object to rank {ctx.rank}")
    barrier()
    if ctx.is_main and step >= cfg.steps:
        final = {"model": model.state_dict(), "step": step, "rank_sum": rank_sum}
        save_checkpoint(final, run_dir / "final.pt")
        print(json.dumps({"final_step": step}), flush=True)
    log.close()


def main(cfg: TinyConfig) -> int:
    with distributed(cfg.device) as ctx, StopSignal() as stop:
        train(cfg, ctx, stop)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_trainer(main, TinyConfig)
