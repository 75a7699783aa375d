"""Helpers shared by the preparation commands: whole-split replacement, image writes and selective zip extraction."""

from __future__ import annotations

import os
import shutil
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from shared.atomic_io import atomic_open, atomic_path


class PrepareError(ValueError):
    """A preparation command cannot go on; the message names the file or option and what to do."""


def fail(message: str) -> None:
    """Stop a preparation command with one clear sentence (the CLI prints it on one line, exit code 2)."""
    raise PrepareError(message)


@contextmanager
def replacing_folders(targets: Sequence[Path], *, src: Path | None = None) -> Iterator[dict[Path, Path]]:
    """Build the folders of a split in empty temporary siblings, then swap each into place as a whole.

    Yields {target: temporary folder}; write everything into the temporary folders. When the block succeeds each
    target is replaced, so a rerun into an existing destination leaves no file of an earlier preparation beside the
    new ones; a temporary folder that stayed empty removes its target, as a fresh run would not create it (loaders
    take an existing label folder to mean the split is labelled). When the block fails, the targets are untouched.
    """
    for target in targets:
        if src is not None and Path(src).resolve().is_relative_to(target.resolve()):
            fail(f"--src {src} lies inside {target}, which this command replaces; move the source files elsewhere.")
    building = {target: target.parent / f".{target.name}.partial" for target in targets}
    for partial in building.values():
        shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run
        partial.mkdir(parents=True)
    try:
        yield building
    except BaseException:
        for partial in building.values():
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if hasattr(os, "sync"):
        os.sync()  # the files were written without fsync; a power cut must not leave a swapped-in split of empty files
    for target, partial in building.items():
        _swap_in(partial, target)


def _swap_in(partial: Path, target: Path) -> None:
    """Put `partial` where `target` is: the old folder is renamed aside (a rename within the folder), then deleted."""
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.rename(target, old)
    if any(partial.iterdir()):
        os.rename(partial, target)
    else:
        partial.rmdir()
    shutil.rmtree(old, ignore_errors=True)


def atomic_save_image(array: np.ndarray, path: Path, **save_kwargs) -> None:
    """Save (H, W) or (H, W, 3) uint8 via a temporary name, so an interrupted run leaves no truncated file."""
    # Not fsynced: a dataset has many thousands of files, and a rerun rewrites any that a power cut lost.
    with atomic_path(path, suffix=".tmp" + path.suffix, durable=False) as tmp:
        Image.fromarray(array).save(tmp, **save_kwargs)


def extract_members(zip_path: Path, target: Callable[[str], Path | None], desc: str) -> int:
    """Extract each member for which `target(name)` gives a destination; returns how many were written."""
    if not zip_path.is_file():
        fail(f"{zip_path} not found; download it from the dataset's official site into --src.")
    written = 0
    with zipfile.ZipFile(zip_path) as archive:
        jobs = [(info, target(info.filename)) for info in archive.infolist() if not info.is_dir()]
        jobs = [(info, dest) for info, dest in jobs if dest is not None]
        if not jobs:
            fail(f"{zip_path} holds no files of the expected layout; is it the right archive?")
        for info, dest in tqdm(jobs, desc=desc, unit="file"):
            with archive.open(info) as src, atomic_open(dest, "wb", durable=False) as out:
                shutil.copyfileobj(src, out)
            written += 1
    return written
