"""Fit the cosine k-means baseline on cached backbone features and export it as a segmenter.

    python -m baselines.kmeans.fit dataset=camvid_sample [backbone=dinov2_vits14 n_init=5 ...]

Writes runs/kmeans/<dataset>/<name>/{config.yaml, metrics.json, export/segmenter.pt}.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from baselines.kmeans.kmeans import cosine_kmeans
from shared.atomic_io import atomic_write_text
from shared.backbone import build_backbone, snap_to_patch
from shared.config import parse_args, save_resolved_config
from shared.data import build_dataset
from shared.data.feature_cache import FeatureCache
from shared.evaluation import evaluate_head
from shared.probes import LinearProbe
from shared.seed import seed_everything
from shared.segmenter import load, save_segmenter


@dataclass
class KMeansConfig:
    name: str = "default"
    output_root: str = "runs"
    seed: int = 0
    deterministic: bool = False
    resume: str = ""  # unused: fitting is one shot, kept for the common command line
    device: str = "auto"
    data_root: str = ""

    dataset: str = "camvid_sample"
    train_split: str = "train"
    val_split: str = "val"
    five_crop: bool = False
    resolution: int = 224
    val_resolution: int = 322
    backbone: str = "dinov2_vits14"
    backbone_weights: str = ""  # "" = official weights, "none" = random init, else a path
    feature_layer: int = -1
    cache_dir: str = "cache/features"

    n_clusters: int = 0  # 0 = the dataset's number of classes
    n_init: int = 5  # seeded restarts; the lowest inertia wins
    max_iter: int = 100
    init: str = "k-means++"  # or "random"
    max_samples: int = 200_000  # patch vectors drawn (seeded) from the training features
    alpha: float = 10.0  # softmax temperature of the exported cluster probe (cosines live in [-1, 1])
    linear_probe_steps: int = 0  # > 0 fits an optional linear probe on the labels (reported separately)
    extra_policy: str = "error"
    evaluate: bool = True


def sample_patch_vectors(features: np.ndarray, max_samples: int, seed: int) -> torch.Tensor:
    """Flatten cached features (N, C, h, w) into at most `max_samples` patch vectors (M, C), L2-normalised."""
    n, c, h, w = features.shape
    total = n * h * w
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(max_samples, total), replace=False))
    image, pos = np.divmod(chosen, h * w)
    rows = []
    for i in np.unique(image):  # read the memmap one image at a time
        block = np.asarray(features[i], dtype=np.float32).reshape(c, h * w)
        rows.append(block[:, pos[image == i]].T)
    return F.normalize(torch.from_numpy(np.concatenate(rows)), dim=1)


def fit_linear_probe(features: np.ndarray, labels: np.ndarray, n_classes: int, steps: int,
                     seed: int) -> LinearProbe:
    """Optional linear probe on the L2-normalised features, trained with Adam on random mini-batches."""
    torch.manual_seed(seed)
    probe = LinearProbe(features.shape[1], n_classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=5e-3)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = np.sort(rng.choice(len(features), size=min(16, len(features)), replace=False))
        code = F.normalize(torch.from_numpy(np.asarray(features[idx], dtype=np.float32)), dim=1)
        loss = probe.loss(probe(code), torch.from_numpy(np.asarray(labels[idx])).long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return probe.eval()


def export(path: Path, cfg: KMeansConfig, centres: torch.Tensor, probe: LinearProbe | None, backbone,
           n_classes: int, resolution: int) -> Path:
    """Segmenter: code = l2norm(features); cluster centres = the k-means centres; the optional linear probe."""
    linear = {} if probe is None else {"linear_weight": probe.conv.weight, "linear_bias": probe.conv.bias}
    return save_segmenter(
        path, code_branches=[[{"op": "l2norm"}]], state_dict={}, cluster_centres=centres, alpha=cfg.alpha, **linear,
        metadata={"method": "kmeans", "backbone": cfg.backbone, "backbone_weights_id": backbone.weights_id,
                  "pretrained_backbone": bool(backbone.pretrained), "feature_layer": cfg.feature_layer,
                  "resolution": resolution, "n_classes": n_classes, "n_clusters": int(centres.shape[0]),
                  "code_dim": int(centres.shape[1]), "dataset": cfg.dataset, "probabilistic": False})


def main(cfg: KMeansConfig) -> dict:
    seed_everything(cfg.seed, cfg.deterministic)
    run_dir = Path(cfg.output_root) / "kmeans" / cfg.dataset / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, run_dir)
    device = "cpu"  # k-means on a sample of patch vectors is cheap; the feature cache does the heavy lifting
    backbone = build_backbone(cfg.backbone, cfg.backbone_weights or None, layer=cfg.feature_layer, device=device)
    data_root = cfg.data_root or None
    res = snap_to_patch(cfg.resolution, backbone.patch_size)
    val_res = snap_to_patch(cfg.val_resolution, backbone.patch_size)
    train_ds = build_dataset(cfg.dataset, cfg.train_split, data_root=data_root, resolution=res,
                             five_crop=cfg.five_crop)
    cache = FeatureCache(cfg.cache_dir)
    train = cache.get(backbone, train_ds)
    k = cfg.n_clusters or train_ds.n_classes

    vectors = sample_patch_vectors(train.features, cfg.max_samples, cfg.seed)
    result = cosine_kmeans(vectors, k, n_init=cfg.n_init, max_iter=cfg.max_iter, init=cfg.init, seed=cfg.seed)
    print(f"k-means: K={k}, {len(vectors)} vectors, inertia {result.inertia:.2f} after {result.n_iter} iterations")
    probe = None
    if cfg.linear_probe_steps > 0 and train.labels is not None:
        probe = fit_linear_probe(train.features, train.labels, train_ds.n_classes, cfg.linear_probe_steps, cfg.seed)
    exported = export(run_dir / "export" / "segmenter.pt", cfg, result.centres, probe, backbone, train_ds.n_classes,
                      val_res)

    metrics = {"inertia": result.inertia, "n_clusters": k}
    if cfg.evaluate:
        val_ds = build_dataset(cfg.dataset, cfg.val_split, data_root=data_root, resolution=val_res)
        if val_ds.has_labels:
            val, val_flip = cache.get(backbone, val_ds), cache.get(backbone, val_ds, flip=True)
            # The exported segmenter itself is scored, so these numbers are the ones `compare` reproduces.
            scores = evaluate_head(load(exported), val, flipped=val_flip,
                                   n_classes=val_ds.n_classes, n_clusters=k, extra_policy=cfg.extra_policy)
            metrics["unsupervised"] = {"acc": scores["unsupervised"]["acc"], "miou": scores["unsupervised"]["miou"]}
            if scores.get("linear"):
                metrics["linear"] = {"acc": scores["linear"]["acc"], "miou": scores["linear"]["miou"]}
            print(f"{cfg.val_split}: unsupervised acc {metrics['unsupervised']['acc']:.1f} "
                  f"mIoU {metrics['unsupervised']['miou']:.1f} ({cfg.extra_policy} policy)")
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    print(f"exported {run_dir / 'export' / 'segmenter.pt'}")
    return metrics


if __name__ == "__main__":
    main(parse_args(KMeansConfig, sys.argv[1:]))
