"""Runs that differ only in their seed: grouping, mean ± standard deviation, and paired differences with t-intervals.

Two runs are *seeds of one recipe* when their run directories' `config.yaml` agree on every key except those in
`IGNORED_KEYS` (the seed, the run name, and how the run was started: `resume`, `overwrite`; a resumed run equals
an uninterrupted one) and their exports name the same method. The git commit is part of the recipe: runs trained
from different code are never grouped. A run without a readable `config.yaml` (a bare segmenter.pt2) is never
grouped, nor are two runs of one recipe with the same seed (the group would count one seed twice).

Per group and score: the mean, the sample standard deviation (n - 1 in the denominator; none for n = 1) and n, over
the members that have the score. Two groups that share at least two seeds are compared pairwise on those seeds:
the per-seed differences d_k = a_k - b_k, their mean and the 95% t-interval mean ± t(0.975, n - 1) * sd(d) / sqrt(n)
(`scipy.stats.t`). Pure functions over plain dicts: no torch, no evaluation.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import yaml

IGNORED_KEYS = ("seed", "name", "resume", "overwrite")
# Flat result keys (`compare.report.flat_row`) that get a mean and standard deviation.
SCORE_KEYS = ("unsupervised_acc", "unsupervised_miou", "crf_acc", "crf_miou", "smoothed_acc", "smoothed_miou",
              "linear_acc", "linear_miou", "ece", "nll", "images_per_s", "peak_memory_mib")
# The scores a paired comparison is shown for in report.md (results.json has every score).
PAIRED_SCORES = ("unsupervised_miou", "unsupervised_acc", "crf_miou", "crf_acc", "smoothed_miou", "linear_miou",
                 "linear_acc")
CONFIDENCE = 0.95
_SEED_SUFFIX = re.compile(r"_seed\d+$")


def run_directory(run: str | Path) -> Path | None:
    """The run directory of a `--runs` entry: the folder itself, or the run above export/segmenter.pt2."""
    path = Path(run)
    if path.is_dir():
        return path
    if path.parent.name == "export":
        return path.parent.parent
    return None


def run_recipe(run: str | Path, metadata: dict | None) -> tuple[str | None, int | None]:
    """(recipe key, seed) of a run: the canonical JSON of its config.yaml without IGNORED_KEYS plus the exported
    method, and the config's seed. (None, seed) when the run has no readable config.yaml."""
    seed = None if metadata is None or metadata.get("seed") is None else int(metadata["seed"])
    folder = run_directory(run)
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) if folder else None
    except (OSError, yaml.YAMLError):
        config = None
    if not isinstance(config, dict) or metadata is None:
        return None, seed
    seed = int(config["seed"]) if isinstance(config.get("seed"), int) else seed
    kept = {k: v for k, v in config.items() if k not in IGNORED_KEYS}
    return json.dumps({"method": metadata.get("method"), "config": kept}, sort_keys=True, default=str), seed


def group_indices(recipes: Sequence[str | None], seeds: Sequence[int | None]) -> list[list[int]]:
    """Indices of the runs grouped by recipe, in order of first appearance; a run that cannot be grouped is a
    group of its own. A recipe whose runs repeat a seed is not grouped."""
    by_recipe: dict[str, list[int]] = {}
    for i, key in enumerate(recipes):
        if key is not None and seeds[i] is not None:
            by_recipe.setdefault(key, []).append(i)
    groups, placed = [], set()
    for i in range(len(recipes)):
        if i in placed:
            continue
        members = by_recipe.get(recipes[i], [i]) if recipes[i] is not None and seeds[i] is not None else [i]
        if len({seeds[j] for j in members}) != len(members):
            members = [i]
        members = sorted(members, key=lambda j: seeds[j])
        groups.append(members)
        placed.update(members)
    return groups


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation with n - 1, n); std None for n < 2, both None for n = 0."""
    n = len(values)
    if n == 0:
        return None, None, 0
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std, n


def t_interval(differences: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high): the two-sided t-interval of the mean of paired differences (n >= 2)."""
    from scipy.stats import t

    mean, std, n = mean_std(differences)
    if n < 2:
        raise ValueError(f"a t-interval needs at least two paired differences, got {n}.")
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return mean, mean - half, mean + half


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def group_name(names: Sequence[str]) -> str:
    """`stego/demo` for `stego/demo_seed0`, `stego/demo_seed1`; else the first name with `(seeds)`."""
    stripped = {_SEED_SUFFIX.sub("", name) for name in names}
    if len(stripped) == 1 and all(_SEED_SUFFIX.search(name) for name in names):
        return stripped.pop()
    return f"{names[0]} (seeds)"


def summarize_group(rows: Sequence[dict], members: Sequence[int], seeds: Sequence[int | None]) -> dict:
    """One group's summary: name, runs, seeds, n (runs that succeeded), and per score mean, std and n."""
    ok = [j for j in members if rows[j].get("status") == "ok"]
    scores = {}
    for key in SCORE_KEYS:
        values = [v for v in (_number(rows[j].get(key)) for j in ok) if v is not None]
        if values:
            mean, std, n = mean_std(values)
            scores[key] = {"mean": mean, "std": std, "n": n}
    return {"name": group_name([rows[j]["method"] for j in members]), "runs": [rows[j]["path"] for j in members],
            "seeds": [seeds[j] for j in members], "n": len(ok), "n_runs": len(members), "scores": scores,
            "members": list(members)}


def paired(rows: Sequence[dict], a: dict, b: dict, seeds: Sequence[int | None]) -> list[dict]:
    """Per score, the mean difference a - b over the seeds both groups ran successfully, and its t-interval."""
    def by_seed(group: dict) -> dict[int, dict]:
        return {seeds[j]: rows[j] for j in group["members"] if rows[j].get("status") == "ok"}

    rows_a, rows_b = by_seed(a), by_seed(b)
    common = sorted(set(rows_a) & set(rows_b))
    out = []
    for key in SCORE_KEYS:
        pairs = [(_number(rows_a[s].get(key)), _number(rows_b[s].get(key))) for s in common]
        differences = [x - y for x, y in pairs if x is not None and y is not None]
        if len(differences) < 2:
            continue
        mean, low, high = t_interval(differences)
        out.append({"a": a["name"], "b": b["name"], "score": key, "seeds": common, "n": len(differences),
                    "mean_difference": mean, "ci_low": low, "ci_high": high, "confidence": CONFIDENCE})
    return out


def summarize(rows: Sequence[dict], recipes: Sequence[str | None], seeds: Sequence[int | None]) -> dict:
    """{"groups": [summary of every group of two or more runs], "units": [member indices of every table row],
    "paired": [paired differences of every two groups sharing two or more seeds]}. rows: flat result rows."""
    units = group_indices(recipes, seeds)
    groups = [summarize_group(rows, members, seeds) for members in units if len(members) > 1]
    comparisons = [entry for i, a in enumerate(groups) for b in groups[i + 1:] for entry in paired(rows, a, b, seeds)]
    return {"groups": groups, "units": units, "paired": comparisons}


def figure_members(summary: dict) -> list[int]:
    """Indices of the runs the figure shows: every ungrouped run and the first (lowest) seed of each group."""
    return [members[0] for members in summary["units"]]
