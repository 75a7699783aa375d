"""Disk planning for the feature cache: its size before a build, a free-space check, and pre-allocated files.

A memory-mapped write into a sparse file on a full disk kills the process with SIGBUS, after hours of backbone
work. Checking the free space first and reserving every byte up front (posix_fallocate) turns a full disk into
a one-line error before any work is spent.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np

FEATURE_BYTES, LABEL_BYTES = 2, 2  # float16 features, int16 labels
DISK_MARGIN_BYTES = 1 << 30  # left free beyond the cache: logs, checkpoints and other jobs need some room too
SHRINK_HINT = ("free space, point cache_dir at a larger filesystem, or shrink the cache: no flip for the training "
               "split, fewer crops (five_crop=false), or use_cache=false to compute the backbone live")


class CacheSpaceError(RuntimeError):
    """The filesystem of the cache folder has too little free space for a build."""


def cache_bytes(n_images: int, channels: int, grid: int | tuple[int, int], resolution: int, *,
                labels: bool = True) -> int:
    """Bytes of one cache: features n x C x h x w x 2 (float16) plus labels n x R x R x 2 (int16) when labelled."""
    h, w = (grid, grid) if isinstance(grid, int) else grid
    features = n_images * channels * h * w * FEATURE_BYTES
    return features + (n_images * resolution * resolution * LABEL_BYTES if labels else 0)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def free_bytes(folder: Path) -> int:
    """Free bytes on the filesystem that holds `folder` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Raise CacheSpaceError (one line) unless `folder`'s filesystem has `needed` bytes plus the margin free."""
    free = free_bytes(folder)
    if free < needed + DISK_MARGIN_BYTES:
        raise CacheSpaceError(f"{what} needs {human_bytes(needed)} in {folder} (plus a {human_bytes(DISK_MARGIN_BYTES)}"
                              f" margin) but only {human_bytes(free)} are free; {SHRINK_HINT}.")


def no_space_error(folder: Path, needed: int, err: OSError) -> CacheSpaceError:
    """The one-line error for an ENOSPC met while writing into `folder`."""
    return CacheSpaceError(f"No space left in {folder} for the feature cache ({human_bytes(needed)} needed there: "
                           f"{err.strerror}); {SHRINK_HINT}.")


def _reserve(fd: int, nbytes: int) -> None:
    """Allocate `nbytes` on disk for `fd`; where the filesystem cannot, fall back to a sparse file."""
    if nbytes == 0:
        return
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except AttributeError:  # not available on this platform (macOS)
        os.ftruncate(fd, nbytes)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, nbytes)  # the filesystem has no fallocate: a full disk may still surface later


def allocate(path: Path, nbytes: int) -> None:
    """Create `path` with `nbytes` reserved on disk; a full disk raises CacheSpaceError naming the folder."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _reserve(fd, nbytes)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise no_space_error(path.parent, nbytes, err) from None
        raise
    finally:
        os.close(fd)


def allocated_memmap(path: Path, dtype: type, shape: tuple[int, ...]) -> np.memmap | None:
    """A writable memmap over a freshly allocated file (None, and an empty file, when there are no rows)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    allocate(path, nbytes)
    if nbytes == 0:
        return None  # numpy cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r+", shape=shape)
