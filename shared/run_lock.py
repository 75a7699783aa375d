"""The exclusive lock of a run directory, so two processes never train into it at once (imported by
`shared.run_dir`; kept apart and free of heavy imports so that taking the lock is cheap)."""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"


class RunDirError(ValueError):
    """A run directory cannot be used as asked (it holds another run, or a base segmenter is unusable)."""


class RunLockedError(RunDirError):
    """Another live process is training into the run directory."""


@contextmanager
def run_lock(run_dir: str | os.PathLike, enabled: bool = True) -> Iterator[Path | None]:
    """Hold an exclusive lock on ``<run_dir>/.lock`` for the ``with`` block, so two processes never train into
    the same run directory at once; RunLockedError (naming the holder's pid and host) if another process holds it.

    ``fcntl.flock`` locks belong to the open file, so the OS releases them when the holder exits or crashes: a
    ``.lock`` file left by a dead process does not block (its text is only the last holder's note). The file
    is never deleted, since deleting it would let a second process lock a new file while the first still holds
    the old one. Under DDP pass ``enabled=is_main``: rank 0 holds the lock for the job. flock works across NFS
    clients on Linux (emulated with byte-range locks) but not on every network filesystem.
    """
    if not enabled:
        yield None
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise RunLockedError(f"run directory {run_dir} is in use by {holder}; wait for that run to finish or stop it, "
                             "or pick another name=...") from None
    try:
        os.ftruncate(fd, 0)
        note = f"pid {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})"
        os.pwrite(fd, note.encode(), 0)
        yield path
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
