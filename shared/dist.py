"""One code path for ``torchrun`` (DDP) and plain ``python``: every trainer runs inside ``distributed()``.

::

    with distributed(cfg.device) as ctx:          # DistContext(rank, world_size, local_rank, device, is_main)
        model = DDP(model.to(ctx.device), device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
        ...
        all_reduce_sum(histogram)                  # sums over ranks; a no-op when nothing is initialised

Under ``torchrun`` (``RANK`` set) the process group is initialised from the environment. Without it, a
one-process group is created on an in-memory store (no port, no file), so the same DDP code runs unchanged.
The backend is ``nccl`` when the device is CUDA, otherwise ``gloo``. The group is destroyed in a ``finally``.

Device strings: ``"auto"`` -> ``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``; ``"cuda"`` ->
``cuda:<LOCAL_RANK>``; ``"cpu"``; or an explicit ``"cuda:N"`` (single process only).

The collective helpers (``all_reduce_sum``, ``all_reduce_mean``, ``barrier``, ``broadcast_object``) are
no-ops when no process group is initialised, so library code can call them unconditionally.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistContext",
    "init_distributed",
    "cleanup_distributed",
    "distributed",
    "resolve_device",
    "is_initialized",
    "get_rank",
    "get_world_size",
    "get_local_rank",
    "is_main_process",
    "all_reduce_sum",
    "all_reduce_mean",
    "all_reduce_max",
    "barrier",
    "broadcast_object",
    "flag_device",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job. ``device`` is the torch.device it should compute on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool


class DeviceUnavailableError(RuntimeError):
    """The configured device does not exist on this machine (the message says which to use)."""


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """Turn a config device string into a torch.device (see the module docstring for the rules)."""
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(f"device={device!r} was requested but CUDA is not available; use "
                                         "device=cpu or auto.")
        return torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"Unknown device {device!r}; use auto, cpu, cuda or cuda:N.")


def is_initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank, 0 when no process group is initialised."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """Number of processes, 1 when no process group is initialised."""
    return dist.get_world_size() if is_initialized() else 1


def get_local_rank() -> int:
    """Rank on this machine (``LOCAL_RANK`` from torchrun), 0 otherwise."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0 (and when not distributed): the process that writes logs and checkpoints."""
    return get_rank() == 0


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise RuntimeError(f"RANK is set but {name} is not; launch with torchrun, or unset RANK to run one process.")
    return int(value)


def init_distributed(device: str | torch.device = "auto") -> DistContext:
    """Initialise the default process group (from torchrun's environment, or a 1-process group).

    If a group already exists it is reused. Prefer the ``distributed()`` context manager, which also cleans up.
    """
    if "RANK" in os.environ:
        rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    else:
        rank, world_size, local_rank = 0, 1, 0
    if world_size > 1 and str(device).strip().lower().startswith("cuda:"):
        raise ValueError(
            f"device={device!r} names one GPU, but all {world_size} ranks of this torchrun job would share it; "
            "use device=cuda or auto so that each rank takes cuda:<LOCAL_RANK>."
        )
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # so nccl and broadcast_object use this rank's GPU
    if not is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size)
        else:
            # An in-memory store: no free port to find and nothing to clean up on disk.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistContext(rank, world_size, local_rank, dev, rank == 0)


def cleanup_distributed() -> None:
    """Destroy the default process group if one exists (safe to call twice)."""
    if is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed(device: str | torch.device = "auto") -> Iterator[DistContext]:
    """Context manager: initialise (see ``init_distributed``), yield the DistContext, destroy in ``finally``.

    A group that already existed on entry is left alone on exit. On a normal exit the ranks first meet at a
    barrier, so no rank tears its group down (and exits) while a peer is still finishing, e.g. rank 0 writing
    the final checkpoint; after an exception there is no barrier (the other ranks may never arrive).
    Build the DDP model inside a function called in the ``with`` block, so it is released before the group.
    """
    owned = not is_initialized()
    ctx = init_distributed(device)
    finished = False
    try:
        yield ctx
        finished = True
    finally:
        if owned:
            if finished:
                barrier()
            cleanup_distributed()


def _active() -> bool:
    return is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    """``dist.all_reduce`` in place, wherever ``t`` lives: NCCL reduces only CUDA tensors, so a CPU tensor (a
    metric histogram, say) takes a round trip through :func:`flag_device`."""
    device = flag_device()
    if t.device == device:
        dist.all_reduce(t, op=op)
        return t
    moved = t.to(device)
    dist.all_reduce(moved, op=op)
    return t.copy_(moved)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks in place and return it (CPU or CUDA, any backend); a no-op without a
    multi-process group."""
    if _active():
        _all_reduce(t, dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average a floating-point ``t`` over all ranks in place and return it."""
    if not t.is_floating_point():
        raise TypeError(f"all_reduce_mean needs a floating-point tensor, got {t.dtype}; use all_reduce_sum.")
    if _active():
        _all_reduce(t, dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``t`` over all ranks, in place (used to agree on stop / error flags)."""
    if _active():
        _all_reduce(t, dist.ReduceOp.MAX)
    return t


def barrier() -> None:
    """Wait for every rank; a no-op without a multi-process group."""
    if _active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (picklable objects only); identity without a group."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def flag_device() -> torch.device:
    """Device for small control tensors in collectives (nccl needs CUDA tensors, gloo CPU ones)."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
