"""One way to finish a run: export the evaluation head, reload the export, score the reloaded program through
the code path `compare` uses (so a trainer's final numbers and `make compare` agree exactly), write
``final_metrics.json`` and draw the prediction figure from the scored predictions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shared import dist as sdist
from shared.atomic_io import atomic_write_text
from shared.evaluation import score_segmenter, score_summary
from shared.features import canonical_descriptor
from shared.run_dir import EXPORT_RELATIVE
from shared.segmenter import load, save
from shared.viz import clusters_to_classes, colorize, palette_for, save_grid, to_uint8_image, uncertainty_colormap

FINAL_METRICS = "final_metrics.json"


@dataclass
class FinishedRun:
    """What `finish_run` returns: the flat final metrics, the export's path, the in-memory head that was exported
    (eval mode) and the full score dicts."""

    metrics: dict
    export_path: Path
    head: nn.Module
    scores: dict


def export_metadata(cfg: Any, method: str, backbone: Any, *, n_classes: int, n_clusters: int, code_dim: int,
                    resolution: int, probabilistic: bool = False, **extra: Any) -> dict:
    """The metadata every export carries (see `shared.segmenter`), from the common run config keys."""
    return {"method": method, "backbone": backbone.name, "backbone_weights_id": backbone.weights_id,
            "pretrained_backbone": bool(backbone.pretrained), "features": canonical_descriptor(backbone.descriptor),
            "resolution": int(resolution), "n_classes": int(n_classes), "n_clusters": int(n_clusters),
            "code_dim": int(code_dim), "dataset": cfg.dataset, "probabilistic": bool(probabilistic),
            "selected_by": cfg.select_by, "extra_policy": cfg.extra_policy, "seed": int(cfg.seed),
            "run_name": cfg.name, **extra}


def figure_indices(n_images: int, n_figure: int) -> list[int]:
    """The first images of rank 0's shard (evaluation shards by stride), so rank 0 holds every one it draws."""
    return list(range(0, n_images, sdist.get_world_size()))[:n_figure]


def prediction_figure(path: Path, scores: dict, dataset: Any, n_classes: int, title: str) -> None:
    """Image / ground truth / scored prediction (clusters mapped to classes) [/ variance] for the kept images."""
    palette = palette_for(dataset.name if hasattr(dataset, "name") else "", None)
    mapping = scores["unsupervised"]["mapping"]
    kept = scores["kept"]
    with_variance = any(v["variance"] is not None for v in kept.values())
    rows = []
    for index in sorted(kept):
        item = dataset[index]
        label = item["label"].numpy().copy()
        label[(label < 0) | (label >= n_classes)] = -1
        row = [to_uint8_image(item["image"]), colorize(label, palette),
               colorize(clusters_to_classes(kept[index]["prediction"], mapping), palette)]
        if with_variance:
            variance = kept[index]["variance"]
            row.append(uncertainty_colormap(variance) if variance is not None else None)
        rows.append(row)
    titles = ["image", "ground truth", title] + (["variance"] if with_variance else [])
    save_grid(rows, path, titles=titles)


def finish_run(*, cfg: Any, method: str, run_dir: Path, head: nn.Module, example_features: torch.Tensor,
               metadata: dict, val: Any, val_flip: Any, val_ds: Any, logger: Any, is_main: bool,
               extra_metrics: dict | None = None, device: str | torch.device = "cpu") -> FinishedRun:
    """Export ``head`` to ``<run_dir>/export/segmenter.pt2``, reload it, score the reloaded program on the cached
    validation features (flip-averaged; CRF when ``cfg.crf_at_end``), write ``final_metrics.json`` and
    ``figures/predictions.png``. Collective under DDP: every rank scores its shard of the images."""
    export_path = run_dir / EXPORT_RELATIVE
    head = head.eval()
    if is_main:
        save(export_path, head, example_features.detach().float().cpu(), metadata)
    sdist.barrier()
    segmenter = load(export_path, map_location=device)
    keep = figure_indices(len(val), cfg.n_figure_images)
    scores = score_segmenter(segmenter, val, flipped=val_flip, n_classes=val_ds.n_classes,
                             extra_policy=cfg.extra_policy, batch_size=cfg.val_batch_size,
                             crf_images=val_ds if cfg.crf_at_end else None, device=str(device), keep=keep)
    summary = score_summary(scores) | {"extra_policy": cfg.extra_policy, "selected_by": cfg.select_by,
                                       "pretrained_backbone": bool(metadata["pretrained_backbone"]),
                                       **(extra_metrics or {})}
    if is_main:
        if keep:
            prediction_figure(run_dir / "figures" / "predictions.png", scores, val_ds, val_ds.n_classes,
                              f"{method} (scored)")
        atomic_write_text(run_dir / FINAL_METRICS, json.dumps(_plain(summary), indent=2) + "\n")
        numbers = {k: v for k, v in summary.items() if isinstance(v, float)}
        logger.scalars(int(metadata.get("steps", 0)), numbers, prefix="final")
        logger.write("final: " + ", ".join(f"{k} {v:.2f}" for k, v in numbers.items()))
        logger.write(f"exported {export_path}")
    return FinishedRun(metrics=summary, export_path=export_path, head=head, scores=scores)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
