"""benchmarks.run_all: schema rendering, tolerance of other shapes, skipping missing modules, repeat medians, the
--device option."""

import sys
import types

import pytest

from benchmarks import run_all, timing


def test_schema_rows_render_with_computed_ratio():
    result = {"title": "Backbone", "rows": [{"name": "bf16", "value": 30.0, "unit": "images/s", "reference": "fp32"},
                                            {"name": "fp32", "value": 12.0, "unit": "images/s"}],
              "notes": ["a note"]}
    text = "\n".join(run_all.render_result("benchmarks.backbone", "desc", result))
    assert "## Backbone" in text
    assert "| bf16 | 30 | images/s | fp32 | 2.50× |" in text
    assert "- a note" in text


def test_any_dict_of_scalars_renders_as_a_table():
    text = "\n".join(run_all.render_result("benchmarks.x", "X bench", {"rate": 3.14159, "sub": {"n": 4}}))
    assert "## X bench" in text
    assert "| rate | 3.142 |" in text
    assert "| sub.n | 4 |" in text


def test_missing_and_failing_modules_are_reported_and_others_run(monkeypatch, tmp_path):
    good = types.ModuleType("benchmarks._fake_good")
    good.run = lambda: {"title": "Good", "rows": [{"name": "a", "value": 1.0, "unit": "s"}]}
    bad = types.ModuleType("benchmarks._fake_bad")

    def boom():
        raise RuntimeError("broken benchmark")

    bad.run = boom
    monkeypatch.setitem(sys.modules, "benchmarks._fake_good", good)
    monkeypatch.setitem(sys.modules, "benchmarks._fake_bad", bad)
    monkeypatch.setattr(run_all, "BENCHMARKS", [("benchmarks._fake_missing", "missing one"),
                                                ("benchmarks._fake_bad", "bad one"),
                                                ("benchmarks._fake_good", "good one")])
    path = run_all.write_results(tmp_path / "results.md", run_all.run_benchmarks())
    text = path.read_text()
    assert "not present yet, skipped" in text
    assert "FAILED: RuntimeError: broken benchmark" in text
    assert "## Good" in text and "| a | 1 | s |" in text
    assert "CPU:" in text and "torch" in text


def test_repeats_take_the_median_of_each_row():
    calls = [{"rows": [{"name": "a", "value": v, "unit": "s"}]} for v in (5.0, 1.0, 3.0)]
    merged = run_all.merge_repeats(calls)
    assert merged["rows"][0]["value"] == 3.0


def test_a_benchmark_does_not_inherit_the_previous_ones_thread_count(monkeypatch):
    import torch

    seen = []
    pinning = types.ModuleType("benchmarks._fake_pinning")
    pinning.run = lambda: torch.set_num_threads(1) or {"rows": []}
    recording = types.ModuleType("benchmarks._fake_recording")
    recording.run = lambda: seen.append(torch.get_num_threads()) or {"rows": []}
    monkeypatch.setitem(sys.modules, "benchmarks._fake_pinning", pinning)
    monkeypatch.setitem(sys.modules, "benchmarks._fake_recording", recording)
    monkeypatch.setattr(run_all, "BENCHMARKS", [("benchmarks._fake_pinning", "pins"),
                                                ("benchmarks._fake_recording", "records")])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run_all.run_benchmarks()
        assert seen == [2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_device_cuda_without_cuda_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(timing.DEVICE_ENV, "cpu")  # restored after the test, whatever main sets
    code = run_all.main(["--device", "cuda", "--out", str(tmp_path / "results.md")])
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("\n") == 1 and "--device cuda" in err and "Traceback" not in err
    assert not (tmp_path / "results.md").exists()


@pytest.mark.parametrize(("option", "has_cuda", "expected"), [("cuda", True, "cuda:0"), ("auto", True, "cuda:0"),
                                                              ("auto", False, "cpu"), ("cpu", True, "cpu")])
def test_device_reaches_the_benchmarks_and_the_header(monkeypatch, tmp_path, option, has_cuda, expected):
    import torch

    # A pretend GPU: nothing below runs a kernel, so only the device's name is ever asked for.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_cuda)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Pretend GPU")
    monkeypatch.setenv(timing.DEVICE_ENV, "cpu")
    seen = []
    recording = types.ModuleType("benchmarks._fake_device")
    recording.run = lambda: seen.append(timing.bench_device()) or {"rows": []}
    monkeypatch.setitem(sys.modules, "benchmarks._fake_device", recording)
    monkeypatch.setattr(run_all, "BENCHMARKS", [("benchmarks._fake_device", "records the device")])
    assert run_all.main(["--device", option, "--out", str(tmp_path / "results.md")]) == 0
    assert seen == [torch.device(expected)]
    label = "cuda:0 (Pretend GPU)" if expected == "cuda:0" else "cpu"
    assert f"- measured on: {label}\n" in (tmp_path / "results.md").read_text()
