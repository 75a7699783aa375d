"""Helpers shared by the preparation commands: atomic image writes and selective zip extraction."""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from shared.atomic_io import atomic_open, atomic_path


def fail(message: str) -> None:
    """Stop a preparation command with one clear sentence (no traceback)."""
    raise SystemExit(f"error: {message}")


def atomic_save_image(array: np.ndarray, path: Path, **save_kwargs) -> None:
    """Save (H, W) or (H, W, 3) uint8 via a temporary name, so an interrupted run leaves no truncated file."""
    # Not fsynced: a dataset has many thousands of files, and a rerun rewrites any that a power cut lost.
    with atomic_path(path, suffix=".tmp" + path.suffix, durable=False) as tmp:
        Image.fromarray(array).save(tmp, **save_kwargs)


def extract_members(zip_path: Path, target: Callable[[str], Path | None], desc: str) -> int:
    """Extract each member for which `target(name)` gives a destination; returns how many were written.

    Files already present with the member's size are kept, so an interrupted extraction can be rerun.
    """
    if not zip_path.is_file():
        fail(f"{zip_path} not found; download it from the dataset's official site into --src.")
    written = 0
    with zipfile.ZipFile(zip_path) as archive:
        jobs = [(info, target(info.filename)) for info in archive.infolist() if not info.is_dir()]
        jobs = [(info, dest) for info, dest in jobs if dest is not None]
        if not jobs:
            fail(f"{zip_path} holds no files of the expected layout; is it the right archive?")
        for info, dest in tqdm(jobs, desc=desc, unit="file"):
            if dest.exists() and dest.stat().st_size == info.file_size:
                continue
            with archive.open(info) as src, atomic_open(dest, "wb", durable=False) as out:
                shutil.copyfileobj(src, out)
            written += 1
    return written
