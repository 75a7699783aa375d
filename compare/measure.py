"""Peak-memory measurement for one batch of a head, on CPU and on CUDA.

CPU: torch allocates tensors outside Python's allocator, so `tracemalloc` does not see them, and the process's
lifetime peak (`ru_maxrss`) is usually set earlier by building the feature cache. Linux lets a process reset its
own resident-set high-water mark (`echo 5 > /proc/self/clear_refs`), so we reset it before the batch and read
`VmHWM - VmRSS(before)` after it. glibc would otherwise serve a batch's large tensors from memory that earlier
batches freed but kept resident, so the growth would depend on what ran before (it read 0 for the first method
and the full size for the second); we therefore fix glibc's mmap threshold at 64 KiB once, which gives every
large allocation fresh pages that go back to the system when freed (`pin_mmap_threshold`, called by
`compare.run` before anything big is allocated). Where `/proc/self/clear_refs` is not
writable we fall back to the growth of `ru_maxrss` (a lower bound, possibly 0 when an earlier step used more).
CUDA: `torch.cuda.max_memory_allocated` after a reset.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import resource
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
MIB = 1024.0 * 1024.0
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_malloc_pinned = False


def pin_mmap_threshold() -> None:
    """Make glibc mmap every allocation above 64 KiB (and unmap it on free), once per process; no-op elsewhere.

    Call it before the big allocations: chunks freed into the heap before the call are still reused."""
    global _malloc_pinned
    if _malloc_pinned or not sys.platform.startswith("linux"):
        return
    _malloc_pinned = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):  # not glibc (musl, macOS): the measurement is then a lower bound
        pass


def _status_kib(key: str) -> int | None:
    """A `/proc/self/status` field in KiB, or None where the file does not exist (not Linux)."""
    try:
        match = re.search(rf"^{key}:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_rss_peak() -> bool:
    """Reset the resident-set high-water mark to the current RSS; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _maxrss_kib() -> float:
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / 1024.0 if sys.platform == "darwin" else float(value)


class PeakMemory:
    """Largest memory growth (MiB) over several measured blocks: `with peak.measure(): ...`; read `peak.mib`."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.mib = 0.0
        self.method = "cuda max_memory_allocated" if self.device.type == "cuda" else "resident set high-water mark"

    @contextmanager
    def measure(self):
        """Measure the block's peak growth above the memory in use when it starts."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            grown = torch.cuda.max_memory_allocated(self.device) - start
            self.mib = max(self.mib, grown / MIB)
            return
        pin_mmap_threshold()
        exact = _reset_rss_peak() and _status_kib("VmRSS") is not None
        start = _status_kib("VmRSS") if exact else _maxrss_kib()
        if not exact:
            self.method = "growth of ru_maxrss (lower bound)"
        yield
        end = _status_kib("VmHWM") if exact else _maxrss_kib()
        self.mib = max(self.mib, (end - start) / 1024.0)
