"""Side-by-side comparison of exported segmenters on one dataset split.

    python -m compare.run --dataset camvid_sample --split val \
        --runs "runs/stego/camvid_sample/demo runs/kmeans/camvid_sample/demo" [--resolution 322] \
        [--backbone-weights PATH|none] [--extra-policy error|majority|drop] [--no-crf] [--out compare_output/<dataset>]

Every run (a run directory holding export/segmenter.pt2, or a segmenter.pt2) is scored on the same split, resolution,
backbone features (cached, image and flip) and metric policy. Runs that differ only in their seed are reported as
one row of mean ± standard deviation, with paired comparisons over shared seeds (`compare.seeds`). Writes
report.md, results.csv, results.json and comparison.png as one set: into a temporary folder beside --out, which
then replaces --out as a whole, so a report and a figure from different comparisons never sit side by side.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compare.evaluate import (
    EvalOptions,
    LoadedMethod,
    MethodResult,
    evaluate_method,
    failed_result,
    first_line,
    group_by_backbone,
    load_methods,
    time_backbone,
)
from compare.figure import figure_indices_for, save_comparison_figure
from compare.measure import pin_mmap_threshold
from compare.report import grouped_table, markdown_table, untrained_banner, write_reports
from compare.seeds import figure_members, run_recipe, summarize
from dinov2_patched import RANDOM_WEIGHTS_ID
from shared import dist as sdist
from shared.cli import at_least
from shared.probes import ProbeRecipe


@dataclass
class CompareSettings:
    """Everything that fixes how the methods are compared (the CLI's options)."""

    dataset: str
    runs: list[str]
    split: str = "val"
    data_root: str | None = None
    resolution: int | None = None
    backbone_weights: str | None = None
    extra_policy: str = "error"
    crf: bool = True
    allow_mixed_backbones: bool = False
    out: str | None = None
    cache_dir: str = "cache/features"
    batch_size: int = 16
    device: str = "auto"
    figure_rows: int = 4
    panel: int = 160
    probe_split: str = "train"  # the split the evaluator's linear probe is fitted on ("" = no linear columns)
    # The resolution of that split's features; None = the evaluation resolution. The probe is a 1x1 layer on the
    # code, so it can be fitted at the methods' training resolution (as STEGO fits its own probe) and reuse the
    # training caches instead of a backbone pass over the split at the evaluation size.
    probe_resolution: int | None = None


@dataclass
class ComparisonOutput:
    header: dict
    results: list[MethodResult]
    paths: dict[str, Path] = field(default_factory=dict)
    seeds: dict | None = None  # compare.seeds.summarize of the rows
    rows: list[dict] = field(default_factory=list)  # the results as written (with seed and group)


OUTPUT_FILES = ("report.md", "results.csv", "results.json", "comparison.png")


def check_out_dir(out_dir: Path) -> None:
    """--out must be a new folder, or one that holds only a previous comparison (which is replaced)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; pass a folder for the report (it is created when missing).")
    if out_dir.is_dir():
        other = sorted(p.name for p in out_dir.iterdir() if p.name not in OUTPUT_FILES)
        if other:
            raise ValueError(f"--out {out_dir} holds other files ({', '.join(other[:3])}), which replacing it with "
                             "the new report would delete; pass a new or empty folder.")


def publish_outputs(out_dir: Path, build: Callable[[Path], dict[str, Path]]) -> dict[str, Path]:
    """Let `build` write every output into a fresh folder beside `out_dir`, then put that folder in `out_dir`'s
    place (the old one is renamed away first and deleted after). Returns the paths under `out_dir`."""
    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.{secrets.token_hex(4)}.tmp"
    os.mkdir(staging)  # mode 0777 minus the umask, as a folder made by hand (mkdtemp would make it 0700)
    try:
        paths = build(staging)
        old = out_dir.parent / f".{out_dir.name}.{secrets.token_hex(4)}.old"
        if out_dir.exists():
            os.rename(out_dir, old)
        try:
            os.rename(staging, out_dir)
        except OSError:
            if old.exists():
                os.rename(old, out_dir)  # put the previous comparison back
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return {name: out_dir / path.name for name, path in paths.items()}


def seed_rows(methods: list[LoadedMethod], results: list[MethodResult]) -> tuple[list[dict], dict]:
    """The result dicts with each run's seed and seed group, and `compare.seeds.summarize` of them."""
    from compare.report import flat_row

    rows = [r.to_dict() for r in results]
    recipes, seeds = [], []
    for m in methods:
        recipe, seed = run_recipe(m.path, m.segmenter.metadata if m.segmenter is not None else None)
        recipes.append(recipe)
        seeds.append(seed)
    summary = summarize([flat_row(row) for row in rows], recipes, seeds)
    names = {j: g["name"] for g in summary["groups"] for j in g["members"]}
    for j, row in enumerate(rows):
        row.update(seed=seeds[j], group=names.get(j, ""))
    return rows, summary


def default_resolution(backbone_names: list[str]) -> int:
    """322 for DINOv2 (patch 14), 320 for DINO v1 (patch 8 or 16), the evaluation sizes of data.md."""
    patch14 = {"dinov2" in name for name in backbone_names}
    if len(patch14) > 1:
        raise ValueError("the runs mix patch-14 (DINOv2) and patch-8/16 (DINO) backbones; pass --resolution")
    return 322 if patch14 == {True} or not patch14 else 320


def weights_for(weights_id: str, cli_weights: str | None) -> str | None:
    """The `weights` argument of build_backbone: the CLI's, else "none" for a random-weight run, else official."""
    if cli_weights:
        return cli_weights
    return "none" if weights_id == RANDOM_WEIGHTS_ID else None


def _evaluate_group(key: tuple, methods: list[LoadedMethod], dataset: Any, train_dataset: Any,
                    settings: CompareSettings, options: EvalOptions,
                    figure_indices: list[int]) -> tuple[dict, dict[str, MethodResult], Any]:
    """Build one backbone, then per feature descriptor its caches (validation image and flip, training split for
    the linear probe), and score every method of the group on the features its descriptor names."""
    from shared.backbone import build_backbone
    from shared.data.feature_cache import FeatureCache
    from shared.features import descriptor_id

    name, weights_id = key
    group = {"name": name, "weights_id": weights_id, "pretrained": weights_id != RANDOM_WEIGHTS_ID, "features": []}
    results: dict[str, MethodResult] = {}
    labels = None
    try:
        backbone = build_backbone(name, weights=weights_for(weights_id, settings.backbone_weights),
                                  features=methods[0].segmenter.metadata["features"], device=options.device)
        group.update(weights_id=backbone.weights_id, pretrained=bool(backbone.pretrained))
        if backbone.weights_id != weights_id:
            raise ValueError(f"the runs were trained on {name} weights {weights_id} but the backbone loaded weights "
                             f"{backbone.weights_id}; pass --backbone-weights with the file they were trained on")
        group["images_per_s"] = time_backbone(backbone, dataset, device=options.device)
    except Exception as error:  # noqa: BLE001 - the group's methods are reported as failed, other groups go on
        message = first_line(error)
        print(f"backbone {name} failed: {message}", file=sys.stderr)
        return group, {m.path: failed_result(m, message) for m in methods}, None
    cache = FeatureCache(settings.cache_dir)
    by_descriptor: dict[str, list[LoadedMethod]] = {}
    for m in methods:
        by_descriptor.setdefault(descriptor_id(m.segmenter.metadata["features"]), []).append(m)
    for members in by_descriptor.values():
        try:
            featurizer = backbone.with_features(members[0].segmenter.metadata["features"])
            features = cache.get(featurizer, dataset, flip=False, batch_size=settings.batch_size)
            flipped = cache.get(featurizer, dataset, flip=True, batch_size=settings.batch_size)
            train = None
            if train_dataset is not None and train_dataset.has_labels:
                train = cache.get(featurizer, train_dataset, flip=False, batch_size=settings.batch_size)
        except Exception as error:  # noqa: BLE001 - these methods fail, the other descriptors go on
            message = first_line(error)
            results.update({m.path: failed_result(m, message) for m in members})
            continue
        group["features"].append(featurizer.descriptor)
        labels = features.labels if labels is None else labels
        for m in members:
            began = time.perf_counter()
            results[m.path] = evaluate_method(m, features, flipped, dataset, options, figure_indices, train)
            print(f"[compare] {m.name}: {results[m.path].status} in {time.perf_counter() - began:.0f} s", flush=True)
    return group, results, labels


def run_comparison(settings: CompareSettings) -> ComparisonOutput:
    """Load, group, evaluate and write the reports; returns the header, the results and the written paths."""
    from shared.data import build_dataset

    pin_mmap_threshold()  # before any large allocation, so the per-batch peak memory does not depend on history
    out_dir = Path(settings.out or f"compare_output/{settings.dataset}")
    check_out_dir(out_dir)  # before the work, so a bad --out costs nothing
    device = str(sdist.resolve_device(settings.device))
    methods = load_methods(settings.runs, device)
    groups = group_by_backbone(methods, settings.allow_mixed_backbones)
    resolution = settings.resolution or default_resolution([k[0] for k in groups])
    dataset = build_dataset(settings.dataset, settings.split, data_root=settings.data_root, resolution=resolution)
    train_dataset = None
    if settings.probe_split:
        train_dataset = build_dataset(settings.dataset, settings.probe_split, data_root=settings.data_root,
                                      resolution=settings.probe_resolution or resolution)
    recipe = ProbeRecipe() if settings.probe_split else None
    options = EvalOptions(n_classes=dataset.n_classes, extra_policy=settings.extra_policy, crf=settings.crf,
                          batch_size=settings.batch_size, device=device, probe_recipe=recipe)
    figure_indices = figure_indices_for(len(dataset), settings.figure_rows)
    by_path: dict[str, MethodResult] = {m.path: failed_result(m, m.error) for m in methods if m.segmenter is None}
    header_groups, labels = [], None
    for key, members in groups.items():
        group, results, group_labels = _evaluate_group(key, members, dataset, train_dataset, settings, options,
                                                       figure_indices)
        header_groups.append(group)
        by_path.update(results)
        if group_labels is not None and labels is None:
            labels = group_labels
    results = [by_path[m.path] for m in methods]
    header = {"dataset": settings.dataset, "split": settings.split, "n_images": len(dataset),
              "n_classes": dataset.n_classes, "class_names": list(getattr(dataset, "class_names", [])),
              "resolution": resolution, "backbones": header_groups, "extra_policy": settings.extra_policy,
              "crf": settings.crf, "batch_size": settings.batch_size, "device": options.device,
              "runs": list(settings.runs), "figure": None,
              "linear_probe": recipe.describe() + f" (split {settings.probe_split!r} at {train_dataset.resolution} px)"
              if recipe else None}
    rows, seeds = seed_rows(methods, results)
    shown = [results[j] for j in figure_members(seeds)]  # one seed (the first) per group

    def build(folder: Path) -> dict[str, Path]:
        paths = {}
        if labels is not None and any(r.status == "ok" for r in shown):
            paths["figure"] = save_comparison_figure(folder / "comparison.png", dataset, labels, figure_indices,
                                                     shown, settings.panel)
            header["figure"] = "comparison.png"
        return paths | write_reports(folder, header, rows, seeds)

    paths = publish_outputs(out_dir, build)
    return ComparisonOutput(header, results, paths, seeds, rows)


def split_runs(value: str) -> list[str]:
    """One --runs value -> run paths: newline-separated entries, each an existing path taken whole (spaces, commas
    and all) or else split on commas; a single line with neither commas nor an existing path is split on whitespace
    (the older `RUNS="a b"` form)."""
    lines = [line.strip() for line in value.splitlines() if line.strip()]
    if len(lines) == 1 and "," not in lines[0] and not Path(lines[0]).exists():
        return lines[0].split()
    runs = []
    for line in lines:
        parts = [line] if Path(line).exists() else [part.strip() for part in line.split(",")]
        runs += [part for part in parts if part]
    return runs


def parse_args(argv: list[str] | None = None) -> CompareSettings:
    parser = argparse.ArgumentParser(prog="python -m compare.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="dataset name, e.g. camvid_sample")
    parser.add_argument("--runs", nargs="+", default=[],
                        help="run directories (holding export/segmenter.pt2) or segmenter.pt2 files; a value may "
                             "list several, separated by newlines or commas (or by spaces when it is not itself an "
                             "existing path)")
    parser.add_argument("--run", action="append", default=[],
                        help="one run directory or segmenter.pt2, taken as is (repeatable)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--data-root", default=None, help="default: $USS_DATA or ./data")
    parser.add_argument("--resolution", type=at_least(8), default=None, help="default: 322 for DINOv2, 320 for DINO")
    parser.add_argument("--backbone-weights", default=None,
                        help="weights file or 'none'; default: the official file for pretrained runs")
    parser.add_argument("--extra-policy", choices=("error", "majority", "drop", "stego"), default="error")
    parser.add_argument("--no-crf", dest="crf", action="store_false", help="skip the dense-CRF evaluation")
    parser.add_argument("--allow-mixed-backbones", action="store_true",
                        help="compare runs on different backbones, each on its own features")
    parser.add_argument("--out", default=None, help="output folder (default compare_output/<dataset>)")
    parser.add_argument("--cache-dir", default="cache/features")
    parser.add_argument("--batch-size", type=at_least(1), default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--figure-rows", type=at_least(0), default=4)
    parser.add_argument("--probe-split", default="train",
                        help="split the evaluator's linear probe is fitted on; '' for no linear columns")
    parser.add_argument("--probe-resolution", type=at_least(8), default=None,
                        help="resolution of the probe split's features (default: --resolution); the methods' "
                             "training resolution reuses their caches")
    args = parser.parse_args(argv)
    runs = [part for item in args.runs for part in split_runs(item)] + [r for r in args.run if r.strip()]
    if not runs:
        parser.error("no runs: name at least one run directory or segmenter.pt2 with --runs or --run "
                     "(make compare RUNS=...)")
    return CompareSettings(dataset=args.dataset, runs=runs, split=args.split, data_root=args.data_root,
                           resolution=args.resolution, backbone_weights=args.backbone_weights,
                           extra_policy=args.extra_policy, crf=args.crf,
                           allow_mixed_backbones=args.allow_mixed_backbones, out=args.out, cache_dir=args.cache_dir,
                           batch_size=args.batch_size, device=args.device, figure_rows=args.figure_rows,
                           probe_split=args.probe_split, probe_resolution=args.probe_resolution)


def print_summary(output: ComparisonOutput) -> None:
    """The table and where the files are, for the terminal."""
    banner = untrained_banner(output.header)
    if banner:
        print("\n" + banner.lstrip("> "))
    if output.seeds and output.seeds["groups"]:
        print("\n" + grouped_table(output.rows, output.seeds) + "\n")
    else:
        print("\n" + markdown_table([r.to_dict() for r in output.results]) + "\n")
    for name in ("report", "figure", "csv", "json"):
        if name in output.paths:
            print(f"{name}: {output.paths[name]}")


def main(argv: list[str] | None = None) -> int:
    try:
        output = run_comparison(parse_args(argv))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_summary(output)
    return 0 if all(r.status == "ok" for r in output.results) else 1


if __name__ == "__main__":
    from shared.cli import run_cli

    run_cli(main)  # a known error: one line, exit code 2 (--debug shows the traceback)
