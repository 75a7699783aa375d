"""Writing a trained (or converted) STEGO head as an exported segmenter, and the prediction figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.segmenter import save_segmenter
from shared.viz import clusters_to_classes, colorize, palette_for, save_grid, to_uint8_image
from stego.model import StegoHead


def segmenter_metadata(*, backbone: str, backbone_weights_id: str, pretrained_backbone: bool, feature_layer: int,
                       resolution: int, n_classes: int, n_clusters: int, code_dim: int, dataset: str,
                       **extra) -> dict:
    """The metadata every export carries (see `shared.segmenter`), plus method-specific extras."""
    return {"method": "stego", "backbone": backbone, "backbone_weights_id": backbone_weights_id,
            "pretrained_backbone": bool(pretrained_backbone), "feature_layer": int(feature_layer),
            "resolution": int(resolution), "n_classes": int(n_classes), "n_clusters": int(n_clusters),
            "code_dim": int(code_dim), "dataset": dataset, "probabilistic": False, **extra}


def export_stego(path: str | Path, head: StegoHead, cluster_centres: torch.Tensor, alpha: float,
                 linear_probe: nn.Module | None, metadata: dict) -> Path:
    """Write `head` (two conv1x1 branches; dropout vanishes at evaluation) with its probes as a segmenter."""
    weight = bias = None
    if linear_probe is not None:
        weight, bias = linear_probe.conv.weight, linear_probe.conv.bias
    return save_segmenter(path, code_branches=head.code_branches(), state_dict=head.state_dict(),
                          cluster_centres=cluster_centres, alpha=alpha, linear_weight=weight, linear_bias=bias,
                          metadata=metadata)


@torch.no_grad()
def prediction_figure(path: str | Path, head_fn, features: np.ndarray, dataset, mapping: list[int],
                      n_images: int, dataset_name: str) -> None:
    """Grid of image / ground truth / cluster prediction (clusters mapped to classes) for the first images."""
    rows = []
    palette = palette_for(dataset_name)
    n_classes = dataset.n_classes
    for i in range(min(n_images, len(features))):
        item = dataset[i]
        feats = torch.from_numpy(np.asarray(features[i:i + 1], dtype=np.float32))
        logits = head_fn(feats)["cluster_logits"]
        size = item["label"].shape[-2:]
        pred = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(1)[0]
        mapped = clusters_to_classes(pred.numpy(), mapping)
        label = item["label"].numpy().copy()
        label[(label < 0) | (label >= n_classes)] = -1
        rows.append([to_uint8_image(item["image"]), colorize(label, palette), colorize(mapped, palette)])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_grid(rows, path, titles=["image", "ground truth", "STEGO clusters"])
