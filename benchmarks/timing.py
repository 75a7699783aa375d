"""Timing helpers shared by the benchmarks, and the device they measure on.

`python -m benchmarks.run_all --device cpu|cuda|auto` sets $USS_BENCH_DEVICE; every benchmark reads it through
`bench_device()`, so a module run on its own (`USS_BENCH_DEVICE=cuda python -m benchmarks.backbone`) measures on
the same device. CUDA runs asynchronously: the timers below wait for the device's queued work before reading the
clock, or they would time the kernel launches only.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch

from shared.dist import resolve_device

DEVICE_ENV = "USS_BENCH_DEVICE"


def bench_device() -> torch.device:
    """The device the benchmarks measure on: $USS_BENCH_DEVICE (cpu, cuda, cuda:N or auto), default cpu."""
    return resolve_device(os.environ.get(DEVICE_ENV) or "cpu")


def device_label(device: torch.device | str) -> str:
    """"cpu", or "cuda:0 (NVIDIA H200)": how the notes and the results header name a device."""
    device = torch.device(device)
    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)})"


def cpu_only_notes(what: str, device: torch.device | None = None) -> list[str]:
    """A note for a benchmark whose subject runs on the CPU in real use, when the benchmarks' device is not the CPU."""
    device = bench_device() if device is None else device
    if device.type == "cpu":
        return []
    return [f"{what}: CPU work in real use, so measured on the CPU, not on {device}"]


def synchronize(device: torch.device | str) -> None:
    """Wait until `device` has finished its queued work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device | str | None = None) -> float:
    """Wall-clock seconds of one `fn()` call, the work it queued on `device` included (None: `bench_device()`)."""
    device = bench_device() if device is None else device
    synchronize(device)  # work queued before the call is not the call's
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_of(fn: Callable[[], object], repeats: int = 5, warmup: int = 1,
              device: torch.device | str | None = None) -> float:
    """Median seconds of `fn()` (see `seconds`) over `repeats` calls after `warmup` unmeasured ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(seconds(fn, device) for _ in range(repeats))


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                        device: torch.device | str | None = None) -> dict[str, float]:
    """Median seconds of each function (see `seconds`), timed in alternation, one call each per round, so that
    load from other processes on a shared machine falls on all of them alike (timing one after the other made
    a ratio swing by 10x)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(seconds(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}
