"""Fit the cosine k-means baseline on cached backbone features and export it as a segmenter.

    python -m baselines.kmeans.train --config baselines/kmeans/configs/camvid_sample.yaml [key=value ...]
    make train-kmeans DATASET=camvid_sample

Writes runs/kmeans/<dataset>/<name>/{config.yaml, final_metrics.json, export/segmenter.pt2, figures/}.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from baselines.kmeans.config import KMeansConfig
from baselines.kmeans.kmeans import cosine_kmeans
from shared.backbone import build_backbone, snap_to_patch
from shared.cli import run_trainer
from shared.data import build_dataset
from shared.data.feature_cache import FeatureCache
from shared.finish import FinishedRun, export_metadata, finish_run
from shared.logger import RunLogger
from shared.probes import LinearProbe
from shared.run_start import open_run
from shared.seed import seed_everything

METHOD = "kmeans"
CONFIG_CLASS = KMeansConfig


class KMeansHead(nn.Module):
    """features -> {code: l2norm(features), cluster_logits: alpha * cos(code, centres), linear_logits?}."""

    def __init__(self, centres: torch.Tensor, alpha: float, probe: LinearProbe | None = None) -> None:
        super().__init__()
        self.register_buffer("centres", F.normalize(centres.detach().float(), dim=1))
        self.alpha = float(alpha)
        self.probe = probe

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        code = F.normalize(features, dim=1)  # (B, C, h, w)
        out = {"code": code, "cluster_logits": self.alpha * torch.einsum("bchw,kc->bkhw", code, self.centres)}
        if self.probe is not None:
            out["linear_logits"] = self.probe(code)
        return out


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
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # its default init would draw from the global stream
        probe = LinearProbe(features.shape[1], n_classes)
    with torch.no_grad():  # its own generator: the global stream stays untouched
        probe.conv.weight.copy_(torch.randn(probe.conv.weight.shape, generator=generator) * 0.01)
        probe.conv.bias.zero_()
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


def main(cfg: KMeansConfig) -> FinishedRun:
    # open_run: the run directory, locked for the run, checked (no fresh start over another run), config.yaml.
    with open_run(cfg, METHOD) as run_dir:
        return fit(cfg, run_dir)


def fit(cfg: KMeansConfig, run_dir) -> FinishedRun:
    seed_everything(cfg.seed, cfg.deterministic)
    logger = RunLogger(run_dir)
    device = "cpu"  # k-means on a sample of patch vectors is cheap; the feature cache does the heavy lifting
    backbone = build_backbone(cfg.backbone, cfg.backbone_weights or None, features=cfg.features,
                              force_float32=cfg.force_float32, device=device)
    data_root = cfg.data_root or None
    res, val_res = snap_to_patch(cfg.resolution, backbone.patch_size), snap_to_patch(cfg.val_resolution,
                                                                                     backbone.patch_size)
    train_ds = build_dataset(cfg.dataset, cfg.train_split, data_root=data_root, resolution=res,
                             five_crop=cfg.five_crop)
    val_ds = build_dataset(cfg.dataset, cfg.val_split, data_root=data_root, resolution=val_res)
    cache = FeatureCache(cfg.cache_dir)
    verify = cfg.verify_cache
    train = cache.get(backbone, train_ds, verify=verify)
    val, val_flip = cache.get(backbone, val_ds, verify=verify), cache.get(backbone, val_ds, flip=True, verify=verify)
    k = cfg.n_clusters or train_ds.n_classes

    vectors = sample_patch_vectors(train.features, cfg.max_samples, cfg.seed)
    if len(vectors) < k:
        raise ValueError(f"n_clusters={k} but only {len(vectors)} patch vectors were drawn; lower n_clusters or raise "
                         "max_samples.")
    result = cosine_kmeans(vectors, k, n_init=cfg.n_init, max_iter=cfg.max_iter, init=cfg.init, seed=cfg.seed)
    logger.write(f"k-means: K={k}, {len(vectors)} vectors, inertia {result.inertia:.2f} after {result.n_iter} "
                 "iterations")
    probe = None
    if cfg.linear_probe_steps > 0 and train.labels is not None:
        probe = fit_linear_probe(train.features, train.labels, train_ds.n_classes, cfg.linear_probe_steps, cfg.seed)
    head = KMeansHead(result.centres, cfg.alpha, probe)
    metadata = export_metadata(cfg, METHOD, backbone, n_classes=val_ds.n_classes, n_clusters=k,
                               code_dim=backbone.feature_dim, resolution=val_ds.resolution)
    example = torch.from_numpy(np.asarray(val.features[:2], dtype=np.float32))
    finished = finish_run(cfg=cfg, method=METHOD, run_dir=run_dir, head=head, example_features=example,
                          metadata=metadata, val=val, val_flip=val_flip, val_ds=val_ds, logger=logger, is_main=True,
                          extra_metrics={"inertia": result.inertia, "n_clusters": k})
    logger.close()
    return finished


if __name__ == "__main__":
    run_trainer(main, KMeansConfig)
