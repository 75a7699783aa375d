"""benchmarks.timing: the timers wait for CUDA's queued work; a benchmark measures on `bench_device()`."""

import torch

from benchmarks import segmenter, timing


def test_timers_synchronise_cuda_before_and_after_each_timed_call(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *_: events.append("sync"))  # no GPU needed
    timing.median_of(lambda: events.append("fn"), repeats=2, warmup=1, device="cuda")
    assert events == ["fn", "sync", "fn", "sync", "sync", "fn", "sync"]
    events.clear()
    timing.interleaved_medians({"a": lambda: events.append("a"), "b": lambda: events.append("b")}, repeats=1,
                               warmup=0, device="cuda")
    assert events == ["sync", "a", "sync", "sync", "b", "sync"]
    events.clear()
    timing.median_of(lambda: events.append("fn"), repeats=2, warmup=0, device="cpu")
    assert events == ["fn", "fn"]


def test_the_segmenter_benchmark_loads_and_runs_on_the_bench_device(monkeypatch):
    # cpu:0 is a device this machine has that differs from the default cpu, so hard-coding "cpu" is caught.
    device = torch.device("cpu", 0)
    monkeypatch.setattr(segmenter, "bench_device", lambda: device)
    locations = []
    real_load = segmenter.load
    monkeypatch.setattr(segmenter, "load", lambda path, map_location="cpu": locations.append(map_location)
                        or real_load(path, map_location))
    result = segmenter.run(repeats=1)
    assert locations and all(location == device for location in locations)
    assert "load and forward on cpu:0; export on the CPU" in result["notes"]
    assert {row["name"]: row["value"] for row in result["rows"]}["max |reloaded - in-memory| at 23x23"] < 1e-5
