"""Provenance of a run: the git commit of the code and whether it had uncommitted changes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

_REPO_DIR = Path(__file__).resolve().parent.parent


def _git(args: list[str], repo_dir: str | os.PathLike | None) -> str | None:
    """stdout of ``git <args>`` run in ``repo_dir`` (default: this package's checkout), or None on any failure."""
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=repo_dir or _REPO_DIR,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_commit(repo_dir: str | os.PathLike | None = None) -> str:
    """Commit hash of the code's checkout (or of ``repo_dir``); ``"unknown"`` outside a git repository."""
    return _git(["rev-parse", "HEAD"], repo_dir) or "unknown"


def git_dirty(repo_dir: str | os.PathLike | None = None) -> bool | None:
    """True when tracked files have uncommitted changes; None outside a git repository."""
    out = _git(["status", "--porcelain", "--untracked-files=no"], repo_dir)
    return None if out is None else out != ""
