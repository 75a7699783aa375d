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
    "ece", "nll", "calibration_source", "images_per_s", "peak_memory_mib",
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


def render_markdown(header: dict, results: Sequence[dict]) -> str:
    """The whole `report.md`."""
    banner = untrained_banner(header)
    parts = ["# Side-by-side comparison", ""]
    if banner:
        parts += [banner, ""]
    parts += header_lines(header) + ["", markdown_table(results), ""]
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


def write_reports(out_dir: str | Path, header: dict, results: Sequence[dict]) -> dict[str, Path]:
    """Write report.md, results.csv and results.json into `out_dir`; returns their paths by name."""
    out_dir = Path(out_dir)
    payload = {"header": header, "results": list(results)}
    return {
        "report": atomic_write_text(out_dir / "report.md", render_markdown(header, results)),
        "csv": atomic_write_text(out_dir / "results.csv", render_csv(results)),
        "json": atomic_write_text(out_dir / "results.json", json.dumps(_json_safe(payload), indent=2) + "\n"),
    }
