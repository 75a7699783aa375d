"""Atomic file writes: a file appears under its final name complete, or not at all.

Everything the toolkit writes that a later step trusts (checkpoints, exported segmenters, configs, kNN files,
reports, prepared datasets) goes through here: the bytes go to a temporary file in the same folder, which is
renamed over the target only once it is complete. An interrupted write leaves the previous file untouched and,
at worst, a hidden `.<name>.*.tmp` file beside it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = ".tmp", durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, rename it over `path`.

    Use it for writers that want a file name (PIL, matplotlib, numpy); pass a `suffix` that ends in the real
    extension when the writer picks its format from the name (e.g. ".tmp.png"). With `durable` the data and
    the rename are fsynced, so a power cut cannot leave an empty file under the final name; bulk writers of
    many small files (dataset preparation) turn it off. On any error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync(path.parent)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None,
                durable: bool = True) -> Iterator[IO]:
    """`open(path, mode)` for writing, made atomic with :func:`atomic_path`."""
    with atomic_path(path, durable=durable) as tmp, open(tmp, mode, encoding=encoding) as f:
        yield f


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)



def _new_temporary(folder: Path, *, prefix: str, suffix: str) -> Path:
    """Create an empty, uniquely named file in `folder` with the mode of a normally created file.

    Not `tempfile.mkstemp`: its files are 0600, and the rename would carry that mode to the final file. Asking for
    0666 lets the umask (and a default ACL) decide, as for `open(path, "w")`; O_EXCL keeps the name unique.
    """
    for _ in range(100):
        candidate = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"could not create a temporary file {prefix}*{suffix} in {folder}; remove stale ones.")


def _fsync(path: Path) -> None:
    """fsync a file or a folder; silently skipped where the platform or filesystem does not support it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
