"""Turn the comparison's results into `report.md`, `results.csv` and `results.json`.

Pure formatting: no torch, no evaluation. A result is a plain dict (one per method, see
`compare.evaluate.MethodResult.to_dict`) and the header is a plain dict describing what every number was
measured on (`compare.evaluate.ComparisonHeader.to_dict`). Every file is written atomically (temporary file in
the same folder, then `os.replace`), so an interrupted run never leaves a half-written report.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

from shared.atomic_io import atomic_write_text

EXTRA_POLICY_TEXT = {
    "error": "a pixel predicted as a cluster with no matched class counts as wrong",
    "majority": "each unmatched cluster is mapped to its majority class",
    "drop": "pixels predicted as an unmatched cluster are dropped from the totals (compatibility only)",
    "stego": "exactly the original STEGO code: pixels predicted as a cluster id >= K are dropped before matching",
}

UNTRAINED_BANNER = (
    "> **UNTRAINED BACKBONE.** The backbone ({what}) had random weights, not pretrained ones. "
    "Every number in this report comes from an untrained backbone and says nothing about the methods' real quality."
)

# (column title, result key, formatter). Keys are flat names from `flat_row`.
TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("method", "method", "text"),
    ("backbone", "backbone_label", "text"),
    ("unsup. Acc", "unsupervised_acc", "pct"),
    ("unsup. mIoU", "unsupervised_miou", "pct"),
    ("+CRF Acc", "crf_acc", "pct"),
    ("+CRF mIoU", "crf_miou", "pct"),
    ("+own post mIoU", "smoothed_miou", "pct"),
    ("linear Acc", "linear_acc", "pct"),
    ("linear mIoU", "linear_miou", "pct"),
    ("ECE", "ece_label", "text"),
    ("NLL", "nll_label", "text"),
    ("images/s", "images_per_s", "rate"),
    ("peak MiB", "peak_memory_mib", "mib"),
    ("selected by", "selected_by", "text"),
    ("status", "status_label", "text"),
)

CSV_FIELDS = (
    "method", "path", "status", "error", "backbone", "backbone_weights_id", "pretrained_backbone", "features",
    "selected_by", "probabilistic", "unsupervised_acc", "unsupervised_miou", "crf_acc", "crf_miou", "smoothed_acc",
    "smoothed_miou", "linear_acc", "linear_miou",
    "ece", "nll", "calibration_source", "images_per_s", "peak_memory_mib", "seed", "group",
)


def _score(result: dict, kind: str, key: str) -> float | None:
    scores = result.get(kind)
    return None if not scores else scores.get(key)


def backbone_label(result: dict) -> str:
    """`dinov2_vits14 (UNTRAINED)` or `dinov2_vits14 (<weights id prefix>)`; empty when unknown."""
    if not result.get("backbone"):
        return ""
    if result.get("pretrained_backbone") is False:
        return f"{result['backbone']} (UNTRAINED)"
    weights = str(result.get("backbone_weights_id") or "?")
    return f"{result['backbone']} ({weights[:12]})"


def flat_row(result: dict) -> dict:
    """One method's result as a flat dict of the table's and the CSV's columns."""
    calibration = result.get("calibration") or {}
    # A dagger marks ECE/NLL of a method that does not claim calibrated probabilities (see the report's notes).
    mark = "" if calibration.get("source") == "probabilistic" else "†"
    row = {
        "method": result.get("method", "?"),
        "path": result.get("path", ""),
        "status": result.get("status", "failed"),
        "error": result.get("error", ""),
        "backbone": result.get("backbone", ""),
        "backbone_weights_id": result.get("backbone_weights_id", ""),
        "pretrained_backbone": result.get("pretrained_backbone"),
        "features": json.dumps(result.get("features"), sort_keys=True) if result.get("features") else "",
        "selected_by": result.get("selected_by", ""),
        "probabilistic": result.get("probabilistic"),
        "backbone_label": backbone_label(result),
        "ece": calibration.get("ece"),
        "nll": calibration.get("nll"),
        "calibration_source": calibration.get("source", ""),
        "ece_label": "—" if calibration.get("ece") is None else f"{calibration['ece']:.3f}{mark}",
        "nll_label": "—" if calibration.get("nll") is None else f"{calibration['nll']:.3f}{mark}",
        "images_per_s": result.get("images_per_s"),
        "peak_memory_mib": result.get("peak_memory_mib"),
        "status_label": "ok" if result.get("status") == "ok" else f"FAILED: {result.get('error', '')}",
        "seed": result.get("seed"),
        "group": result.get("group", ""),
    }
    for kind in ("unsupervised", "crf", "smoothed", "linear"):
        row[f"{kind}_acc"] = _score(result, kind, "acc")
        row[f"{kind}_miou"] = _score(result, kind, "miou")
    return row


def format_cell(value: object, kind: str) -> str:
    """Format one table cell; a missing or non-finite number is an em dash."""
    if kind == "text":
        return str(value if value is not None else "").replace("|", "\\|").replace("\n", " ")
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if kind == "pct":
        return f"{value:.1f}"
    if kind == "rate":
        return f"{value:.3g}" if value < 1000 else f"{value:.0f}"
    if kind == "mib":
        return f"{value:.1f}"
    raise ValueError(f"unknown cell format {kind!r}")


def markdown_table(results: Sequence[dict]) -> str:
    """The comparison table in GitHub markdown, one row per method, in the given order."""
    titles = [title for title, _, _ in TABLE_COLUMNS]
    lines = ["| " + " | ".join(titles) + " |", "| " + " | ".join("---" for _ in titles) + " |"]
    for result in results:
        row = flat_row(result)
        lines.append("| " + " | ".join(format_cell(row[key], kind) for _, key, kind in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


SCORE_OF_COLUMN = {"ece_label": "ece", "nll_label": "nll"}  # text columns that show a number


def _mean_std_cell(score: dict | None, kind: str, mark: str = "") -> str:
    """`45.0 ± 1.2` (the mean alone for n = 1), with the column's number format; an em dash when missing."""
    if not score:
        return "—"
    digits = {"pct": ".1f", "rate": ".3g", "mib": ".1f", "text": ".3f"}[kind]  # text: ECE / NLL
    spread = f" ± {score['std']:{digits}}" if score["std"] is not None else ""
    return f"{score['mean']:{digits}}{spread}{mark}"


def _grouped_row(group: dict, first: dict) -> list[str]:
    """The cells of one group's row; `first`: the flat row of its first member (for the text columns)."""
    cells = []
    for _, key, kind in TABLE_COLUMNS[:-1]:
        if key == "method":
            cells.append(format_cell(group["name"], "text"))
        elif key in SCORE_OF_COLUMN:
            mark = "" if first["calibration_source"] == "probabilistic" else "†"
            cells.append(_mean_std_cell(group["scores"].get(SCORE_OF_COLUMN[key]), "text", mark))
        elif kind == "text":
            cells.append(format_cell(first[key], kind))
        else:
            cells.append(_mean_std_cell(group["scores"].get(key), kind))
    failed = group["n_runs"] - group["n"]
    status = "ok" if not failed else f"{failed} of {group['n_runs']} seeds FAILED"
    return cells + [str(group["n"]), ", ".join(str(s) for s in group["seeds"]), status]


def grouped_table(results: Sequence[dict], summary: dict) -> str:
    """The comparison table with one row per recipe: runs that differ only in seed are one row of mean ± sample
    standard deviation over the seeds that succeeded, with n; every other run keeps its own row (n = 1)."""
    titles = [title for title, _, _ in TABLE_COLUMNS]
    titles = [*titles[:-1], "n", "seeds", titles[-1]]
    lines = ["| " + " | ".join(titles) + " |", "| " + " | ".join("---" for _ in titles) + " |"]
    groups = {tuple(g["members"]): g for g in summary["groups"]}
    for members in summary["units"]:
        first = flat_row(results[members[0]])
        if tuple(members) in groups:
            cells = _grouped_row(groups[tuple(members)], first)
        else:
            single = [format_cell(first[key], kind) for _, key, kind in TABLE_COLUMNS]
            seed = results[members[0]].get("seed")
            cells = [*single[:-1], "1" if first["status"] == "ok" else "0", "—" if seed is None else str(seed),
                     single[-1]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(summary: dict) -> str:
    """Mean difference (first minus second) and its 95% t-interval per score, over the seeds both ran."""
    from compare.seeds import PAIRED_SCORES

    lines = ["| comparison | score | seeds | mean difference | 95% interval |", "| --- | --- | --- | --- | --- |"]
    for entry in summary.get("paired", []):
        if entry["score"] not in PAIRED_SCORES:
            continue
        lines.append(f"| {format_cell(entry['a'], 'text')} − {format_cell(entry['b'], 'text')} | {entry['score']} | "
                     f"{', '.join(str(s) for s in entry['seeds'])} (n = {entry['n']}) | "
                     f"{entry['mean_difference']:+.2f} | [{entry['ci_low']:+.2f}, {entry['ci_high']:+.2f}] |")
    return "\n".join(lines)


def seed_sections(results: Sequence[dict], summary: dict | None) -> list[str]:
    """report.md's main table: the per-run table, or with seed groups the grouped table, the paired comparisons
    and the per-seed rows."""
    if not summary or not summary.get("groups"):
        return [markdown_table(results), ""]
    parts = [grouped_table(results, summary), "",
             "Rows over several seeds: mean ± sample standard deviation (n − 1) over the n seeds that succeeded; "
             "runs are grouped when their config.yaml differs only in seed and name.", ""]
    if summary.get("paired"):
        parts += ["## Paired comparisons over the same seeds", "",
                  "Mean of the per-seed differences (first minus second, in points) and its 95% t-interval "
                  "(t distribution with n − 1 degrees of freedom).", "", paired_table(summary), ""]
    return parts + ["## Per-seed results", "", markdown_table(results), ""]


def untrained_banner(header: dict) -> str:
    """The loud note for runs on a random backbone, or "" when every backbone was pretrained."""
    untrained = [g for g in header.get("backbones", []) if g.get("pretrained") is False]
    if not untrained:
        return ""
    what = ", ".join(g["name"] for g in untrained)
    return UNTRAINED_BANNER.format(what=what)


def header_lines(header: dict) -> list[str]:
    """The bullet list that says what every number was measured on."""
    policy = header.get("extra_policy", "error")
    lines = [
        f"- dataset: `{header.get('dataset')}`, split `{header.get('split')}` "
        f"({header.get('n_images')} images, {header.get('n_classes')} classes)",
        f"- resolution: {header.get('resolution')} (short side resized with nearest, centre crop)",
    ]
    for group in header.get("backbones", []):
        state = "UNTRAINED: random weights" if group.get("pretrained") is False else "pretrained"
        features = ", ".join(f"`{json.dumps(d, sort_keys=True)}`" for d in group.get("features", [])) or "—"
        lines.append(
            f"- backbone: `{group.get('name')}`, weights `{group.get('weights_id')}` ({state}), features {features}; "
            f"{group.get('images_per_s', float('nan')):.3g} images/s measured once for the backbone alone"
        )
    lines += [
        "- metric policy: unsupervised = Hungarian matching of clusters to classes over the whole split, "
        f"extra clusters `{policy}` ({EXTRA_POLICY_TEXT.get(policy, policy)}); linear = identity mapping; "
        "logits averaged over the image and its horizontal flip, then upsampled bilinearly to the label size; "
        "Acc and mIoU in percent",
        f"- CRF: {'dense CRF on the upsampled cluster probabilities' if header.get('crf') else 'not run (--no-crf)'}; "
        "+own post: the method's own post-processing exported with it (`smoothed_logits`), where it has one",
        f"- linear probe: {header.get('linear_probe') or 'not fitted (no --probe-split)'}; the methods' own probes "
        "are training diagnostics, reported in their run directories only",
        "- selected by: which checkpoint the method exported (`last` step by default; `val_miou` chose it with "
        "validation labels, which an unsupervised method does not have)",
        f"- images/s: the head alone (cached features of the image and its flip -> class map), batch "
        f"{header.get('batch_size')}, device `{header.get('device')}`",
        "- peak MiB: the largest growth of resident memory (or CUDA allocated memory) during one batch of the head",
        "- ECE (15 bins) / NLL: softmax of the cluster logits, summed over the clusters matched to each class "
        "(mass in unmatched clusters counts as a wrong class). † marks a method that does not claim calibrated "
        "probabilities: its numbers describe the exported logits' scale, not a model of uncertainty",
    ]
    return lines


def render_markdown(header: dict, results: Sequence[dict], seeds: dict | None = None) -> str:
    """The whole `report.md`; `seeds`: `compare.seeds.summarize` of the results (None: one row per run)."""
    banner = untrained_banner(header)
    parts = ["# Side-by-side comparison", ""]
    if banner:
        parts += [banner, ""]
    parts += header_lines(header) + [""] + seed_sections(results, seeds)
    failed = [r for r in results if r.get("status") != "ok"]
    if failed:
        parts += ["## Failed methods", ""]
        parts += [f"- `{r.get('method')}` ({r.get('path')}): {r.get('error')}" for r in failed] + [""]
    if header.get("figure"):
        parts += [f"![comparison]({header['figure']})", ""]
    if banner:
        parts += [banner, ""]
    return "\n".join(parts)


def render_csv(results: Sequence[dict]) -> str:
    """`results.csv`: one row per method, numbers unrounded."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for result in results:
        writer.writerow({k: ("" if v is None else v) for k, v in flat_row(result).items()})
    return buffer.getvalue()


def _json_safe(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_reports(out_dir: str | Path, header: dict, results: Sequence[dict],
                  seeds: dict | None = None) -> dict[str, Path]:
    """Write report.md, results.csv and results.json into `out_dir`; returns their paths by name. `seeds`:
    the seed groups and paired comparisons (`compare.seeds.summarize`), kept in results.json as "seeds"."""
    out_dir = Path(out_dir)
    payload = {"header": header, "results": list(results)}
    if seeds is not None:
        payload["seeds"] = {"groups": [{k: v for k, v in g.items() if k != "members"} for g in seeds["groups"]],
                            "paired": seeds["paired"]}
    return {
        "report": atomic_write_text(out_dir / "report.md", render_markdown(header, results, seeds)),
        "csv": atomic_write_text(out_dir / "results.csv", render_csv(results)),
        "json": atomic_write_text(out_dir / "results.json", json.dumps(_json_safe(payload), indent=2) + "\n"),
    }
