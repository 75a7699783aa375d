"""Run every benchmark in `benchmarks/` and write `benchmarks/results.md`.

    python -m benchmarks.run_all [--only backbone crf] [--repeats 1] [--device cpu|cuda|auto] [--out PATH]

The benchmark modules are named in `BENCHMARKS` below (an explicit list, no discovery); a module that does not
exist yet, or has no `run()`, is skipped with a note, and one that raises is reported as failed while the others
still run. `--device` (default cpu) is the device the GPU-side subjects (backbone, training step, heads, predict,
dense eigensolver, cache build) are measured on; it reaches the modules as `benchmarks.timing.bench_device()`, and
the results header names it. CPU-only subjects (CRF pool, metrics, PriMaPs pool) stay on the CPU and say so.

Schema of `run()`'s return value (what every benchmark should return):

    {
        "title": "Backbone forward, dinov2_vits14, 224x224",       # str, the section heading
        "rows": [                                                   # one row per measured figure
            {"name": "bf16 autocast", "value": 12.5, "unit": "images/s",
             "reference": "fp32",                                   # optional: the row it is compared with
             "ratio": 1.8},                                         # optional: value / reference's value
            {"name": "fp32", "value": 6.9, "unit": "images/s"},
        ],
        "notes": ["bf16 not supported on this CPU: both rows use fp32"],   # optional list of str
    }

Each `value` should already be the median of several runs (see `benchmarks.timing.median_of`) and
each reference should be measured in the same `run()` call, on the same machine and inputs, so the ratio is fair.
With `--repeats N` run_all also calls each `run()` N times and reports the median of every row's value.
When a row names a `reference` but gives no `ratio`, run_all computes value / reference value itself. A module
that returns another shape is still rendered: any dict of scalars becomes a two-column table (nested dicts get
dotted names), and any other value is printed as text.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks.timing import DEVICE_ENV, bench_device, device_label
from shared.atomic_io import atomic_write_text

# module name -> what it measures. A new benchmark adds one line here.
BENCHMARKS: list[tuple[str, str]] = [
    ("benchmarks.backbone", "backbone forward: fp32 vs bf16 autocast"),
    ("benchmarks.feature_cache", "feature-cache build rate"),
    ("benchmarks.crf", "dense CRF: process pool vs single process"),
    ("benchmarks.metrics", "confusion histogram and Hungarian matching"),
    ("benchmarks.stego_step", "STEGO training step: cached vs uncached features"),
    ("benchmarks.segmenter", "exported segmenter: export and load time, reload equality"),
    ("benchmarks.pusegnet", "PU-SegNet: uncertainty-aware smoothing vs CRF, head throughput vs STEGO"),
    ("benchmarks.predict", "predict throughput vs the backbone alone (ViT-S/14, 322 px, STEGO head)"),
    ("benchmarks.eagle", "EAGLE EiCue eigensolvers: dense vs subset vs ARPACK, with subspace agreement"),
    ("benchmarks.primaps", "PriMaPs proposals: exact direction vs pca_lowrank per mask; pool vs one process"),
    ("benchmarks.stego_deviations", "STEGO deviations from the original: bf16, float16 cache, CRF image, JPEG"),
]

DEFAULT_OUT = Path(__file__).resolve().parent / "results.md"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_lines(device: torch.device | None = None) -> list[str]:
    """The machine description written above the results, `device` (default: `bench_device()`) included."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        f"- measured on: {device_label(bench_device() if device is None else device)}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- CPU: {cpu_model()}, {cores} cores available ({os.cpu_count()} in the machine)",
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}",
    ]
    if hasattr(os, "getloadavg"):
        # Other processes on the cores skew every figure; the load says how quiet the machine was.
        lines.append(f"- 1-minute load average at the start: {os.getloadavg()[0]:.1f}")
    if torch.cuda.is_available():
        lines.append(f"- GPU: {torch.cuda.get_device_name(0)}")
    return lines


def _number(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value).replace("|", "\\|")
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def _flatten(values: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        rows += _flatten(value, name + ".") if isinstance(value, dict) else [(name, value)]
    return rows


def render_schema(result: dict) -> list[str]:
    """Lines of a result that follows the schema: a table of name, value, unit, reference, ratio."""
    rows = result.get("rows") or []
    values = {row.get("name"): row.get("value") for row in rows if isinstance(row, dict)}
    lines = ["| measurement | value | unit | reference | ratio |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        ratio = row.get("ratio")
        ref = row.get("reference")
        if ratio is None and ref in values and isinstance(values[ref], int | float) and values[ref]:
            ratio = row["value"] / values[ref]
        lines.append(f"| {row.get('name', '')} | {_number(row.get('value'))} | {row.get('unit', '')} | "
                     f"{ref or ''} | {'' if ratio is None else f'{ratio:.2f}×'} |")
    return lines


def render_result(module: str, description: str, result: object) -> list[str]:
    """A markdown section for one benchmark, whatever shape its `run()` returned."""
    title = result.get("title") if isinstance(result, dict) and isinstance(result.get("title"), str) else description
    lines = [f"## {title}", "", f"`{module}`", ""]
    if isinstance(result, dict) and isinstance(result.get("rows"), list):
        lines += render_schema(result)
    elif isinstance(result, dict):
        lines += ["| name | value |", "| --- | --- |"]
        scalars = [(name, value) for name, value in _flatten(result) if name not in ("title", "notes")]
        lines += [f"| {name} | {_number(value)} |" for name, value in scalars]
    else:
        lines += ["```", str(result), "```"]
    notes = result.get("notes") if isinstance(result, dict) else None
    if notes:
        lines += [""] + [f"- {note}" for note in ([notes] if isinstance(notes, str) else notes)]
    return lines + [""]


def merge_repeats(results: list[object]) -> object:
    """Median of each schema row's value (and ratio) over repeated `run()` calls; other shapes: the last call."""
    last = results[-1]
    if len(results) == 1 or not (isinstance(last, dict) and isinstance(last.get("rows"), list)):
        return last
    merged = dict(last, rows=[])
    for row in last["rows"]:
        same = [r for res in results for r in res.get("rows", []) if r.get("name") == row.get("name")]
        out = dict(row, value=statistics.median(r["value"] for r in same))
        ratios = [r["ratio"] for r in same if r.get("ratio") is not None]
        if ratios:
            out["ratio"] = statistics.median(ratios)
        merged["rows"].append(out)
    merged["notes"] = list(last.get("notes") or []) + [f"median over {len(results)} calls of run()"]
    return merged


def run_benchmarks(selected: list[str] | None = None, repeats: int = 1) -> list[str]:
    """Import and run each listed benchmark; returns the markdown sections (skips and failures included)."""
    sections = []
    for module, description in BENCHMARKS:
        short = module.rsplit(".", 1)[-1]
        if selected and short not in selected:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise
            sections += [f"## {description}", "", f"`{module}`: not present yet, skipped.", ""]
            continue
        if not callable(getattr(mod, "run", None)):
            sections += [f"## {description}", "", f"`{module}` has no run() function, skipped.", ""]
            continue
        print(f"running {module} ...", flush=True)
        started = time.perf_counter()
        threads = torch.get_num_threads()
        try:
            result = merge_repeats([mod.run() for _ in range(max(1, repeats))])
        except Exception as error:  # noqa: BLE001 - one broken benchmark must not hide the others
            traceback.print_exc()
            sections += [f"## {description}", "", f"`{module}` FAILED: {type(error).__name__}: {error}", ""]
            continue
        finally:
            # Several benchmarks pin torch's thread count; the next one must not inherit it (nor depend on the order).
            torch.set_num_threads(threads)
        print(f"  done in {time.perf_counter() - started:.1f} s", flush=True)
        sections += render_result(module, description, result)
    return sections


def write_results(path: Path, sections: list[str], machine: list[str] | None = None) -> Path:
    """Write the machine description (default: as it is now) and the sections to `path` atomically."""
    text = "\n".join(["# Benchmark results", "", *(machine or machine_lines()), "",
                      "Each value is the median of several runs; ratios compare with a reference measured in the "
                      "same run. On a GPU: `make bench ARGS=\"--device cuda\"` (`make gpu-check` runs it).", "",
                      *sections])
    return atomic_write_text(path, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description="Run the benchmarks.")
    parser.add_argument("--only", nargs="*", default=None, help="short names, e.g. backbone crf")
    parser.add_argument("--repeats", type=int, default=1, help="call each run() this many times (median)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                        help="where the GPU-side subjects are measured (auto: cuda when available)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks.run_all: --device cuda, but CUDA is not available here; use --device cpu or auto.",
              file=sys.stderr)
        return 2
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"  # auto: cuda when available
    os.environ[DEVICE_ENV] = device  # read by every module through bench_device()
    machine = machine_lines()  # before the benchmarks, some of which change torch's thread count
    path = write_results(args.out, run_benchmarks(args.only, args.repeats), machine)
    print(path.read_text())
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
