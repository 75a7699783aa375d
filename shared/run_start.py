"""Starting a run: one context manager that checks and locks the run directory and records the settings.

::

    with distributed(cfg.device) as ctx, open_run(cfg, METHOD, is_main=ctx.is_main) as run_dir:
        ...  # build, train, finish_run(...)

``open_run``, before anything is built: takes the run directory's lock (rank 0; `shared.run_dir.run_lock`), refuses
a fresh start over another run's checkpoints or export unless ``overwrite=true`` (which then removes that run's
files), refuses a resume whose settings differ from the checkpoint's in anything that changes the result
(``check_resume_config``), and only then writes ``config.yaml``, so it always records what the run used. Every rank
raises the same error together. The lock is held until the ``with`` block ends, also on errors.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from shared import dist as sdist
from shared.checkpoint import load_checkpoint, resolve_resume
from shared.config import ConfigError, config_to_dict, save_resolved_config
from shared.config_ranges import RESUME_MAY_DIFFER_KEY
from shared.run_dir import LOCK_NAME, RunDirError, RunLockedError, check_fresh_start, run_directory, run_lock

# Keys that may change when a run is resumed, because none of them changes the weights a run reaches or what it
# exports (every other key must equal the checkpoint's). A method adds its own with field metadata
# {RESUME_MAY_DIFFER_KEY: True}: declare it with `shared.config_ranges.resume_may_differ(default)`.
RESUME_MAY_DIFFER = {
    "max_steps": "training on for more (or stopping at fewer) steps is what resuming is for",
    "val_every": "validation only reads the weights; checkpoints are saved at the steps a run reaches",
    "log_every": "logging only reads the losses",
    "device": "a resumed run may continue on another device (same numbers up to float rounding)",
    "resume": "how this run was started, not how it trains",
    "overwrite": "only matters for a fresh start",
    "n_figure_images": "how many images the final figure shows",
    "val_batch_size": "evaluation batches are scored independently (same scores up to float rounding)",
    "name": "a resumed checkpoint may be continued under another name (a copy of the run)",
    "output_root": "where the run directory lives, not what is in it",
    "cache_dir": "feature caches are keyed by what they hold, so a moved cache gives the same features",
    "data_root": "where the dataset lives on this machine; the dataset and splits themselves must not change",
}


class ResumeMismatchError(RunDirError):
    """The settings of a resumed run differ from those its checkpoint was trained with."""


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: value}


def _may_differ(cfg: Any) -> set[str]:
    """The shared list plus every (dotted) field whose metadata says it may differ."""
    keys = set(RESUME_MAY_DIFFER)

    def visit(obj: Any, prefix: str) -> None:
        for field in getattr(obj, "__dataclass_fields__", {}).values():
            if field.metadata.get(RESUME_MAY_DIFFER_KEY):
                keys.add(prefix + field.name)
            visit(getattr(obj, field.name, None), f"{prefix}{field.name}.")

    visit(cfg, "")
    return keys


def resume_differences(saved: dict, cfg: Any) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (checkpoint's value, this run's value)} for every key that differs and may not.

    A key only one side has counts as a difference (the code changed since the checkpoint was written).
    Tuples and lists compare equal (the checkpoint stores lists).
    """
    allowed = _may_differ(cfg)
    ours, theirs = _flatten(config_to_dict(cfg)), _flatten(saved)
    missing = object()
    out = {}
    for key in sorted(set(ours) | set(theirs)):
        if key in allowed or key.split(".")[0] in allowed:
            continue
        a, b = theirs.get(key, missing), ours.get(key, missing)
        if a != b:
            out[key] = ("(absent)" if a is missing else a, "(absent)" if b is missing else b)
    return out


def check_resume_config(cfg: Any, run_dir: Path, method: str | None = None) -> Path | None:
    """The checkpoint ``cfg.resume`` names (None for a fresh start), after checking it was written by ``method``
    and trained with the same settings as ``cfg``; ResumeMismatchError listing every differing key otherwise."""
    path = resolve_resume(cfg.resume, run_dir)
    if path is None:
        return None
    state = load_checkpoint(path)
    if method is not None and state.get("method") != method:
        raise ResumeMismatchError(f"checkpoint {path} was written by method {state.get('method')!r}, not {method!r}; "
                                  "check the --resume path.")
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise ResumeMismatchError(f"checkpoint {path} records no config, so resuming it cannot be checked; start a "
                                  "new run (another name=..., or overwrite=true).")
    diff = resume_differences(saved, cfg)
    if diff:
        listed = "; ".join(f"{key}: {a!r} in the checkpoint, {b!r} now" for key, (a, b) in diff.items())
        raise ResumeMismatchError(
            f"cannot resume {path} with other settings ({listed}); resume with the checkpoint's values (its run's "
            "config.yaml), or start a new run with another name=... (keys such as max_steps, val_every, log_every "
            "and device may change on resume).")
    return path


def clear_run_dir(run_dir: Path) -> list[str]:
    """Remove everything a previous run left in ``run_dir`` but the lock file (``overwrite=true``); the names."""
    removed = []
    for entry in sorted(run_dir.iterdir()) if run_dir.is_dir() else []:
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
    return removed


def _prepare(cfg: Any, method: str, run_dir: Path, is_main: bool) -> None:
    check_fresh_start(run_dir, cfg.resume, cfg.overwrite)
    resuming = check_resume_config(cfg, run_dir, method) is not None
    if is_main:
        if cfg.overwrite and not resuming:
            removed = clear_run_dir(run_dir)
            if removed:
                print(f"[run] overwrite=true: removed the previous run's {', '.join(removed)} from {run_dir}",
                      flush=True)
        save_resolved_config(cfg, run_dir)


@contextmanager
def open_run(cfg: Any, method: str, *, is_main: bool = True, uses_base_segmenter: bool = False) -> Iterator[Path]:
    """The checked, locked run directory ``<output_root>/<method>/<dataset>/<name>`` (see the module docstring).

    Under DDP call it on every rank (``is_main=ctx.is_main``): rank 0 locks and writes, every rank checks, and a
    failure on rank 0 (the lock) is raised on every rank. A method that trains on another's export passes
    ``uses_base_segmenter=True``; for any other, a ``base_segmenter`` value is an error instead of being ignored.
    """
    if str(getattr(cfg, "base_segmenter", "") or "").strip() and not uses_base_segmenter:
        raise ConfigError(f"base_segmenter={cfg.base_segmenter!r} was given, but {method} does not train on another "
                          "method's export; remove it.")
    run_dir = run_directory(cfg, method)
    with ExitStack() as stack:
        refused = None
        if is_main:
            try:
                stack.enter_context(run_lock(run_dir))
            except RunLockedError as error:
                refused = str(error)
        refused = sdist.broadcast_object(refused)
        if refused is not None:
            raise RunLockedError(refused)
        _prepare(cfg, method, run_dir, is_main)
        sdist.barrier()
        yield run_dir


__all__ = ["RESUME_MAY_DIFFER", "RESUME_MAY_DIFFER_KEY", "ResumeMismatchError", "check_resume_config",
           "clear_run_dir", "open_run", "resume_differences"]
