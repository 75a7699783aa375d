"""Start a trainer process, wait until it has logged, stop it with SIGTERM: the shared part of the signal tests."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


def sigterm_after_logging(cmd: list[str], *, cwd: Path, env: dict[str, str], metrics: Path, lines: int,
                          timeout_s: float) -> tuple[int, str, str]:
    """Run `cmd`, send SIGTERM once `metrics` holds `lines` lines, and return (exit code, stdout, stderr).

    `timeout_s` bounds a hang on a loaded machine (for the start and again for the stop); nothing is timed."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= lines):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, f"the trainer did not log {lines} lines to {metrics}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err
