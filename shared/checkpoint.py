"""Training checkpoints: atomic writes, safe loads, exact resume.

A checkpoint is a plain dict (``make_checkpoint``)::

    format_version, method, step, model (state dict of the unwrapped model: no ``module.`` prefix),
    optimizers {name: state dict}, scaler (GradScaler state or None), config (plain dict), git_commit,
    extra (method-specific, plain values/tensors), rng (list of per-rank RNG states)

Everything in it is loadable with ``torch.load(weights_only=True)``: the RNG states of ``random``, ``numpy``
and ``torch`` (+CUDA) are stored as tensors and plain numbers, so a resumed run continues with the same
random stream as an uninterrupted one.

Typical loop (rank 0 writes; every rank restores)::

    ckpt_path = resolve_resume(cfg.resume, run_dir)            # None -> start from scratch
    step = restore_checkpoint(load_checkpoint(ckpt_path), model=model, optimizers={"main": opt},
                              method="stego") if ckpt_path else 0
    ...
    rng = gather_rng_states()                                  # collective: call on every rank
    if ctx.is_main:
        save_checkpoint(make_checkpoint(model=model, optimizers={"main": opt}, step=step, config=cfg_dict,
                                        method="stego", rng=rng), last_checkpoint_path(run_dir))

Exact resume needs the loop to consume random numbers the same way after a restart: give every DataLoader
its own ``generator`` (creating an iterator otherwise draws from the global torch RNG, and a resumed run
creates one mid-epoch) and reseed it with ``manual_seed(seed + epoch)`` before each epoch's iterator (the
iterator draws the worker seeds, and a RandomSampler its permutation, from it; a resumed run's first
iterator must draw what the uninterrupted run's iterator of that epoch drew), use
``DistributedSampler.set_epoch`` and skip the batches of the current epoch that were already consumed.

``save_checkpoint`` writes a temporary file in the target directory, flushes and fsyncs it, then
``os.replace``-s it over the target, so an interrupted write never damages the previous checkpoint.
"""

from __future__ import annotations

import functools
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from shared import dist as sdist
from shared.atomic_io import atomic_open
from shared.config import config_to_dict
from shared.provenance import git_commit

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "resolve_resume",
    "last_checkpoint_path",
    "make_checkpoint",
    "restore_checkpoint",
    "unwrap_model",
    "rng_state",
    "set_rng_state",
    "gather_rng_states",
]

FORMAT_VERSION = 1
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


class CheckpointError(RuntimeError):
    """A checkpoint file is unreadable or does not match the model / method it is restored into."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def last_checkpoint_path(run_dir: str | os.PathLike) -> Path:
    """``<run_dir>/checkpoints/last.pt``: where trainers keep the checkpoint that ``--resume auto`` uses."""
    return Path(run_dir) / "checkpoints" / "last.pt"


# ----------------------------------------------------------------------------------------------- file I/O


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temp file in the same directory, fsync, ``os.replace``).

    If anything fails (or the process dies) mid-write, the file at ``path`` is the previous one, untouched.
    Returns the path written.
    """
    with atomic_open(path, "wb") as f:
        torch.save(state, f)
    return Path(path)



def _refused_name(err: BaseException) -> str:
    """What torch's weights_only unpickler refused; its own message is many lines that suggest weights_only=False."""
    found = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
    return found.group(1) if found else "objects other than tensors and plain values"


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint dict with ``weights_only=True`` (no arbitrary code runs while loading).

    Raises FileNotFoundError for a missing file and CheckpointError (naming the path) for an empty,
    truncated, corrupt or non-checkpoint file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist; check the path or use --resume auto.")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"Checkpoint {path} is empty (0 bytes); it was truncated, use an earlier checkpoint.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types here (RuntimeError, UnpicklingError, KeyError, EOFError)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights only" in str(err).lower() or "weights_only" in str(err).lower():
            raise CheckpointError(
                f"Checkpoint {path} pickles {_refused_name(err)}, which loading with weights_only=True refuses (it "
                "could run code); it was not written by shared.checkpoint, so re-save it with plain tensors and values."
            ) from err
        if head != _ZIP_MAGIC:
            raise CheckpointError(
                f"{path} is not a PyTorch checkpoint file ({reason}); pass a .pt file written by save_checkpoint, "
                "such as <run_dir>/checkpoints/last.pt."
            ) from err
        raise CheckpointError(
            f"Checkpoint {path} is truncated or corrupt ({reason}); it was probably interrupted while being "
            "written, so resume from an earlier checkpoint."
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(
            f"Checkpoint {path} holds a {type(state).__name__}, not a checkpoint dict; pass a file written by "
            "save_checkpoint."
        )
    return state


def resolve_resume(resume: str | os.PathLike | None, run_dir: str | os.PathLike) -> Path | None:
    """Which checkpoint a run should resume from.

    ``""`` / ``"none"`` / None -> None (fresh start). ``"auto"`` -> ``<run_dir>/checkpoints/last.pt`` if it
    exists, else None (and a note is printed on rank 0). Anything else is a path that must exist; a run
    directory is accepted too and means its ``checkpoints/last.pt``.
    """
    value = "" if resume is None else str(resume).strip()
    if value.lower() in ("", "none"):
        return None
    if value.lower() == "auto":
        last = last_checkpoint_path(run_dir)
        if last.is_file():
            return last
        if sdist.is_main_process():
            print(f"[resume] auto: no checkpoint at {last}; starting from scratch.", flush=True)
        return None
    path = Path(value).expanduser()
    if path.is_dir() and last_checkpoint_path(path).is_file():
        return last_checkpoint_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {value}: no such checkpoint file; pass an existing .pt file, auto or none.")
    return path


# ----------------------------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """This process's python / numpy / torch (+CUDA) RNG states, in a ``weights_only``-loadable form."""
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            torch.cuda.set_rng_state(cuda_states[0])


def gather_rng_states(local: list[dict] | None = None) -> list[dict]:
    """Every rank's ``rng_state()``, indexed by rank (a collective: call it on all ranks before saving).

    ``local``: this process's entries when it stands for several ranks (STEGO's ``micro_batches``: one entry per
    virtual rank, in order); default ``[rng_state()]``. The result is the ranks' lists concatenated in rank order.
    """
    mine = [rng_state()] if local is None else list(local)
    if not (sdist.is_initialized() and sdist.get_world_size() > 1):
        return mine
    everyone: list[Any] = [None] * sdist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return [entry for entries in everyone for entry in entries]


# ----------------------------------------------------------------------------------------------- build / restore


@functools.cache
def _code_commit() -> str:
    return git_commit()


def make_checkpoint(
    *,
    model: nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    step: int,
    config: Any,
    method: str,
    scaler: Any = None,
    extra: dict | None = None,
    rng: list[dict] | None = None,
) -> dict:
    """The checkpoint dict described in the module docstring.

    ``config`` is a plain dict or a config dataclass (converted with ``config_to_dict``). ``rng`` defaults to
    this process's RNG state; pass ``gather_rng_states()`` under DDP so every rank resumes its own stream.
    The tensors are the live parameters and optimizer buffers (no copy): save the dict right away.
    """
    if not isinstance(optimizers, dict):
        raise TypeError("make_checkpoint(optimizers=...) must be a dict such as {'main': optimizer}.")
    if not isinstance(config, dict):
        config = config_to_dict(config)
    return {
        "format_version": FORMAT_VERSION,
        "method": method,
        "step": int(step),
        "model": unwrap_model(model).state_dict(),
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "scaler": scaler.state_dict() if scaler is not None else None,
        "config": config,
        "git_commit": _code_commit(),
        "extra": extra if extra is not None else {},
        "rng": rng if rng is not None else [rng_state()],
    }


def _check_header(state: dict, method: str | None) -> None:
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(
            "This is not a training checkpoint written by shared.checkpoint (no 'format_version' key); resume "
            "from a file that save_checkpoint wrote, such as <run_dir>/checkpoints/last.pt."
        )
    version = state["format_version"]
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint format_version is {version} but this code reads version {FORMAT_VERSION}; "
            "use the code version that wrote it (see its 'git_commit')."
        )
    if method is not None and state.get("method") != method:
        raise CheckpointError(
            f"Checkpoint was written by method {state.get('method')!r} but is being restored into {method!r}; "
            "check the --resume path."
        )


def restore_checkpoint(
    state: dict,
    *,
    model: nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    scaler: Any = None,
    method: str | None = None,
    restore_rng: bool = True,
) -> int:
    """Load model (strict), optimizers, scaler and this rank's RNG state from ``state``; return its step.

    ``method`` (when given) must match the checkpoint's method name. Optimizer names must match exactly.
    """
    _check_header(state, method)
    try:
        unwrap_model(model).load_state_dict(state["model"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"Checkpoint weights (method {state.get('method')!r}, step {state.get('step')}) do not match the "
            f"model; was it trained with a different config? {err}"
        ) from err
    saved = state.get("optimizers", {})
    if set(saved) != set(optimizers):
        raise CheckpointError(
            f"Checkpoint has optimizers {sorted(saved)} but the trainer has {sorted(optimizers)}; they must match."
        )
    for name, opt in optimizers.items():
        opt.load_state_dict(saved[name])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if restore_rng and state.get("rng"):
        _restore_rank_rng(state["rng"])
    return int(state["step"])


def _restore_rank_rng(states: list[dict] | dict) -> None:
    """Restore this rank's saved RNG state (entry ``rank``; with a different world size, entry rank % n)."""
    if isinstance(states, dict):
        states = [states]
    rank, world = sdist.get_rank(), sdist.get_world_size()
    if len(states) != world and rank == 0:
        warnings.warn(
            f"Checkpoint holds RNG states of {len(states)} rank(s) but the job has {world}; random streams "
            "will differ from the original run.",
            stacklevel=3,
        )
    set_rng_state(states[rank % len(states)])
