"""`make demo`: train every method briefly on the bundled CamVid sample and compare them side by side.

    python -m compare.demo [--out demo_output] [--weights PATH|none] [--fast] [--seeds N]

1. Resolves pretrained DINOv2 ViT-S/14 weights (torch hub cache, else download). Where neither works it prints a
   banner saying where to put the file and goes on with random weights; the report then labels every number as
   coming from an untrained backbone.
2. Builds the validation caches the comparison needs, for every feature descriptor the methods' demo configs
   name (the trainers build their training caches; all are reused on a re-run).
3. Trains every method in `METHODS` with its short demo settings, each in its own process, skipping a run whose
   export/segmenter.pt2 already exists for the same backbone weights and the same recipe (command line and
   config file contents). Each step prints its time.
4. Runs the comparison and prints the table and the paths of report.md and comparison.png.

`--seeds N` trains every method with seeds 0..N-1 (runs `demo_seed<k>`), which the comparison reports as mean ±
standard deviation with paired differences; the default is one run (seed 0, run `demo`).

`--fast` shrinks everything (tiny resolution, a few steps) for the test suite; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from compare.run import CompareSettings, ComparisonOutput, print_summary, run_comparison

DATASET = "camvid_sample"
BACKBONE = "dinov2_vits14"
RANDOM = "none"

# Every method of the demo, in training order. "<method>" trains <method>/configs/demo.yaml (tiny.yaml with
# --fast); "<method>+<base>" trains the same method on the export of the run <base> trained earlier in the list
# (PriMaPs "+SotA"). A method whose demo config names `base_segmenter: run:<base>` gets that run's export too.
# Adding a method = adding its name here.
METHODS: list[str] = ["stego", "kmeans", "spectral", "primaps", "primaps+stego", "eagle", "segunify", "pusegnet"]

REPO = Path(__file__).resolve().parents[1]
# probe_resolution: the evaluator's linear probe is fitted on the training split at the resolution the demo configs
# train at (224), so it reads the trainers' caches instead of a second backbone pass over the split at 322.
FULL = {"resolution": 322, "probe_resolution": 224, "run_name": "demo"}
FAST = {"resolution": 56, "probe_resolution": None, "run_name": "demo_fast"}


def banner(lines: list[str]) -> str:
    """A boxed message that stands out in a terminal log."""
    width = max(len(line) for line in lines) + 4
    return "\n".join(["#" * width, *[f"# {line.ljust(width - 4)} #" for line in lines], "#" * width])


def resolve_weights(weights: str | None) -> str:
    """The weights argument every step uses: a file path, or "none" (random) when no pretrained file is found."""
    if weights:
        return weights
    from dinov2_patched import WeightsNotFoundError, model_spec
    from dinov2_patched.weights import cache_dir, resolve_weights

    try:
        return str(resolve_weights(BACKBONE, None, None, True))
    except WeightsNotFoundError as error:
        target = cache_dir() / model_spec(BACKBONE)["file"]
        print(banner([
            "PRETRAINED WEIGHTS UNAVAILABLE: the demo runs on a RANDOM (untrained) DINOv2 ViT-S/14.",
            "Every number it reports comes from an untrained backbone and means nothing.",
            f"To fix: put {target.name} into {target.parent}/",
            "(or pass --weights PATH), then run `make demo` again.",
        ]), flush=True)
        print(f"reason: {error}", flush=True)
        return RANDOM


def demo_descriptors(methods: list[str], fast: bool) -> list[dict]:
    """The feature descriptors the demo's methods read (each one's demo config), once each, in first-use order."""
    import importlib

    from shared.config import load_config
    from shared.features import descriptor_id

    found: dict[str, dict] = {}
    for _, method, _ in plan(methods, fast):
        trainer = importlib.import_module(f"{str(method_dir(method)).replace('/', '.')}.train")
        features = load_config(trainer.CONFIG_CLASS, REPO / demo_config(method, fast)).features
        found.setdefault(descriptor_id(features), features)
    return list(found.values())


def build_caches(weights: str, resolution: int, cache_dir: str, descriptors: list[dict]) -> str:
    """Cache the validation features (image and flip) the comparison reads, for every descriptor the methods use, so
    that each method's printed time is its training (the caches are the comparison's); returns the weights id."""
    from shared.backbone import build_backbone
    from shared.data import build_dataset
    from shared.data.feature_cache import FeatureCache

    backbone = build_backbone(BACKBONE, weights, device="cpu")
    dataset = build_dataset(DATASET, "val", resolution=resolution)
    cache = FeatureCache(cache_dir)
    for descriptor in descriptors:
        featurizer = backbone.with_features(descriptor)
        for flip in (False, True):
            cache.get(featurizer, dataset, flip=flip)
    return backbone.weights_id


RECIPE_FILE = "demo_recipe.json"


def training_recipe(argv: list[str]) -> dict:
    """What a run is trained with: its command line and the content of every `--config` file it names."""
    configs = {value: hashlib.sha1((REPO / value).read_bytes()).hexdigest()
               for flag, value in zip(argv, argv[1:], strict=False) if flag == "--config"}
    return {"argv": argv, "config_files": configs}


def finished(run_dir: Path, weights_id: str, recipe: dict) -> bool:
    """True when the run exported a segmenter over the same backbone weights with the same recipe (command line
    and config file contents), so it need not be retrained; an edited demo.yaml or other flags retrain it."""
    path = run_dir / "export" / "segmenter.pt2"
    recipe_path = run_dir / RECIPE_FILE
    if not path.is_file() or not recipe_path.is_file():
        return False
    from shared.segmenter import read_metadata

    try:
        same_recipe = json.loads(recipe_path.read_text()) == recipe
        return same_recipe and read_metadata(path).get("backbone_weights_id") == weights_id
    except Exception:  # noqa: BLE001 - an unreadable export or recipe is retrained
        return False


def method_dir(method: str) -> Path:
    """<method>/ at the top level, else baselines/<method>/ (relative to the repository)."""
    return Path(method) if (REPO / method / "train.py").is_file() else Path("baselines") / method


def demo_config(method: str, fast: bool) -> Path:
    return method_dir(method) / "configs" / ("tiny.yaml" if fast else "demo.yaml")


def config_base(config: Path) -> str:
    """The `base_segmenter` a demo config names as `run:<method>`, else ""."""
    import yaml

    value = str((yaml.safe_load((REPO / config).read_text()) or {}).get("base_segmenter", "") or "")
    return value[len("run:"):].split("/")[0] if value.startswith("run:") else ""


def plan(methods: list[str], fast: bool) -> list[tuple[str, str, str]]:
    """(entry, method, base entry or "") for every entry of `methods`; a base must come earlier in the list."""
    steps, seen = [], set()
    for entry in methods:
        method, _, base = entry.partition("+")
        base = base or config_base(demo_config(method, fast))
        if base and base not in seen:
            raise ValueError(f"demo entry {entry!r} trains on the {base!r} run, which must come earlier in METHODS")
        steps.append((entry, method, base))
        seen.add(entry)
    return steps


def train_methods(out: Path, weights: str, weights_id: str, cache_dir: str, fast: bool, resolution: int,
                  methods: list[str] | None = None, seeds: int = 1) -> list[str]:
    """Train (or reuse) every method's demo run, per seed when `seeds` > 1; returns the run directories."""
    paths = []
    for seed in range(seeds):
        suffix = f"_seed{seed}" if seeds > 1 else ""
        paths += _train_seed(out, weights, weights_id, cache_dir, fast, resolution, methods, seed, suffix)
    return paths


def _train_seed(out: Path, weights: str, weights_id: str, cache_dir: str, fast: bool, resolution: int,
                methods: list[str] | None, seed: int, suffix: str) -> list[str]:
    """One seed's runs of every method, in the order of `methods` (a "+base" entry trains on this seed's base)."""
    from shared.atomic_io import atomic_write_text

    run_name = (FAST if fast else FULL)["run_name"] + suffix
    runs: dict[str, Path] = {}
    for entry, method, base in plan(methods or METHODS, fast):
        name = run_name if entry == method else f"{run_name}+{base}"
        run_dir = out / "runs" / method / DATASET / name
        config = demo_config(method, fast)
        argv = ["-m", f"{str(method_dir(method)).replace('/', '.')}.train", "--config", str(config),
                f"name={name}", f"output_root={out / 'runs'}", f"backbone_weights={weights}", f"cache_dir={cache_dir}",
                f"val_resolution={resolution}", "device=cpu",
                # The comparison scores every method with the CRF; the trainers' own final CRF pass would repeat it.
                "crf_at_end=false"] + ([f"seed={seed}"] if suffix else [])
        if base:
            argv.append(f"base_segmenter={runs[base] / 'export' / 'segmenter.pt2'}")
        if fast:
            argv.append(f"dataset={DATASET}")
        recipe = training_recipe(argv)
        if finished(run_dir, weights_id, recipe):
            print(f"[demo] {entry}: reusing {run_dir}", flush=True)
        else:
            print(f"[demo] {entry}: training -> {run_dir}\n       {' '.join(argv)}", flush=True)
            started = time.perf_counter()
            done = subprocess.run([sys.executable, *argv, "overwrite=true"], cwd=REPO, check=False)
            state = "done" if done.returncode == 0 else f"FAILED (exit code {done.returncode})"
            print(f"[demo] {entry}: {state} in {time.perf_counter() - started:.0f} s", flush=True)
            if done.returncode == 0:
                atomic_write_text(run_dir / RECIPE_FILE, json.dumps(recipe, indent=2) + "\n")
        # A failed or missing run is still listed, so the report shows it as failed instead of hiding it.
        runs[entry] = run_dir
    return [str(path) for path in runs.values()]


def run_demo(out: str | Path = "demo_output", weights: str | None = None, fast: bool = False,
             cache_dir: str = "cache/features", seeds: int = 1) -> ComparisonOutput:
    """The whole demo; returns the comparison's output (header, results, written paths)."""
    started = time.perf_counter()
    out = Path(out).resolve()
    cache_dir = str(Path(cache_dir).resolve())  # the trainers run with the repository as working directory
    settings = FAST if fast else FULL
    print(f"[demo] backbone {BACKBONE}: resolving weights", flush=True)
    weights = resolve_weights(weights)
    print(f"[demo] building feature caches in {cache_dir}", flush=True)
    weights_id = build_caches(weights, settings["resolution"], cache_dir, demo_descriptors(METHODS, fast))
    runs = train_methods(out, weights, weights_id, cache_dir, fast, settings["resolution"], seeds=seeds)
    print("[demo] comparing", flush=True)
    output = run_comparison(CompareSettings(
        dataset=DATASET, runs=runs, split="val", resolution=settings["resolution"],
        backbone_weights=weights, out=str(out / "compare"), cache_dir=cache_dir, device="cpu",
        crf=True, figure_rows=4, panel=96 if fast else 160, probe_resolution=settings["probe_resolution"]))
    print_summary(output)
    print(f"[demo] finished in {time.perf_counter() - started:.0f} s", flush=True)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compare.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_output", help="folder for the runs and the report")
    parser.add_argument("--weights", default=None, help="DINOv2 ViT-S/14 weight file, or 'none' for random weights")
    parser.add_argument("--fast", action="store_true", help="tiny sizes and step counts (for tests)")
    parser.add_argument("--cache-dir", default="cache/features")
    parser.add_argument("--seeds", type=int, default=1, help="train every method with seeds 0..N-1 (default 1)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    output = run_demo(args.out, args.weights, args.fast, args.cache_dir, seeds=args.seeds)
    return 0 if all(r.status == "ok" for r in output.results) else 1


if __name__ == "__main__":
    from shared.cli import run_cli

    run_cli(main)  # a known error: one line, exit code 2 (--debug shows the traceback)
