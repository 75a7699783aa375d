"""Fit the deep spectral baseline on cached backbone features and export it as a segmenter.

    python -m baselines.spectral.train --config baselines/spectral/configs/camvid_sample.yaml [key=value ...]
    make train-spectral DATASET=camvid_sample

Every training image is segmented on its own (normalised-Laplacian eigenvectors of its patch affinity, then a
fixed-size k-means); the descriptors of all segments are clustered into K classes; the export runs the same
per-image segmentation and names each segment by its nearest class centre. No training loop, no labels.
Writes runs/spectral/<dataset>/<name>/{config.yaml, final_metrics.json, export/segmenter.pt2, figures/}.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from baselines.spectral.clustering import cluster_descriptors
from baselines.spectral.config import SpectralConfig
from baselines.spectral.model import SpectralHead
from baselines.spectral.spectral import colour_affinity, segment_means, spectral_segments
from shared.backbone import build_backbone, snap_to_patch
from shared.cli import run_trainer
from shared.data import build_dataset
from shared.data.feature_cache import FeatureCache
from shared.dist import resolve_device
from shared.finish import FinishedRun, export_metadata, finish_run
from shared.logger import RunLogger
from shared.run_start import open_run
from shared.seed import seed_everything
from shared.viz import colorize, default_palette, save_grid, to_uint8_image

METHOD = "spectral"
CONFIG_CLASS = SpectralConfig


def check_settings(cfg: SpectralConfig, n_images: int, grid: tuple[int, int], k: int) -> None:
    """One-sentence errors for settings that cannot work on these features (before any work is done)."""
    tokens = grid[0] * grid[1]
    if n_images < k:
        raise ValueError(f"the training split has {n_images} images, fewer than n_clusters={k}; use a larger "
                         "train_split or lower n_clusters.")
    if cfg.n_segments < 1 or cfg.n_segments > tokens:
        raise ValueError(f"n_segments={cfg.n_segments} but each image has {grid[0]}x{grid[1]} = {tokens} tokens "
                         f"at resolution {cfg.resolution}, so some segments would have no tokens; set n_segments "
                         f"between 1 and {tokens} or raise the resolution.")
    if cfg.n_eigenvectors < 1 or cfg.n_eigenvectors > tokens:
        raise ValueError(f"n_eigenvectors={cfg.n_eigenvectors} but each image has only {tokens} tokens (one "
                         f"eigenvector each); set n_eigenvectors between 1 and {tokens}.")
    if cfg.segment_iters < 0:
        raise ValueError(f"segment_iters={cfg.segment_iters} must be 0 or more.")


def patch_colours(dataset, indices: np.ndarray, patch: int) -> torch.Tensor:
    """Mean RGB in [0, 1] of every patch of the dataset's images: (B, 3, h, w)."""
    rgb = [torch.from_numpy(to_uint8_image(dataset[int(i)]["image"])).permute(2, 0, 1).float() / 255
           for i in indices]
    return F.avg_pool2d(torch.stack(rgb), kernel_size=patch)


def segment_batch(cfg: SpectralConfig, feats: torch.Tensor, colours: torch.Tensor | None) -> torch.Tensor:
    """(B, n) segment ids of a batch of features (B, C, h, w), with the colour term when it is on."""
    extra = None
    if colours is not None:
        extra = cfg.colour_weight * colour_affinity(colours.to(feats.device), cfg.colour_sigma,
                                                    cfg.colour_space_sigma)
    return spectral_segments(feats, n_eigenvectors=cfg.n_eigenvectors, n_segments=cfg.n_segments,
                             n_iter=cfg.segment_iters, spatial_sigma=cfg.spatial_sigma, extra_affinity=extra)


def collect_descriptors(cfg: SpectralConfig, features: np.ndarray, dataset, patch: int, device: torch.device,
                        progress) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Descriptors (M, C) and token counts (M,) of every non-empty segment of every image; and how many segments
    came out empty (skipped: an empty segment has no descriptor)."""
    descriptors, counts, n_empty = [], [], 0
    starts = range(0, len(features), cfg.batch_size)
    for start in progress(starts):
        indices = np.arange(start, min(start + cfg.batch_size, len(features)))
        feats = torch.from_numpy(np.asarray(features[indices], dtype=np.float32)).to(device)
        colours = patch_colours(dataset, indices, patch) if cfg.colour_weight > 0 else None
        with torch.no_grad():
            means, sizes = segment_means(feats, segment_batch(cfg, feats, colours), cfg.n_segments)
        kept = sizes > 0  # (B, S)
        n_empty += int((~kept).sum())
        descriptors.append(means[kept].cpu())
        counts.append(sizes[kept].cpu())
    return torch.cat(descriptors), torch.cat(counts), n_empty


def segments_figure(path, head: SpectralHead, val, val_ds, n_images: int) -> None:
    """Image / its per-image spectral segments (before naming), for the first validation images."""
    n = min(n_images, len(val))
    if n == 0:
        return
    feats = torch.from_numpy(np.asarray(val.features[:n], dtype=np.float32))
    with torch.no_grad():
        segments = head.segments(feats).reshape(n, *feats.shape[-2:])
    palette = np.array(default_palette(head.n_segments), dtype=np.uint8)
    rows = []
    for i in range(n):
        image = to_uint8_image(val_ds[i]["image"])
        rows.append([image, colorize(segments[i].numpy(), palette)])
    save_grid(rows, path, titles=["image", f"{head.n_segments} spectral segments"])


def main(cfg: SpectralConfig) -> FinishedRun:
    # open_run: the run directory, locked for the run, checked (no fresh start over another run), config.yaml.
    with open_run(cfg, METHOD) as run_dir:
        return fit(cfg, run_dir)


def fit(cfg: SpectralConfig, run_dir) -> FinishedRun:
    seed_everything(cfg.seed, cfg.deterministic)
    logger = RunLogger(run_dir)
    device = resolve_device(cfg.device)
    backbone = build_backbone(cfg.backbone, cfg.backbone_weights or None, features=cfg.features,
                              force_float32=cfg.force_float32, device=device)
    if not backbone.pretrained:
        logger.write("NOTE: random backbone weights (backbone_weights=none): numbers are not meaningful.")
    data_root = cfg.data_root or None
    res, val_res = (snap_to_patch(r, backbone.patch_size) for r in (cfg.resolution, cfg.val_resolution))
    train_ds = build_dataset(cfg.dataset, cfg.train_split, data_root=data_root, resolution=res,
                             five_crop=cfg.five_crop)
    val_ds = build_dataset(cfg.dataset, cfg.val_split, data_root=data_root, resolution=val_res)
    cache = FeatureCache(cfg.cache_dir)
    train = cache.get(backbone, train_ds)
    val, val_flip = cache.get(backbone, val_ds), cache.get(backbone, val_ds, flip=True)
    k = cfg.n_clusters or train_ds.n_classes
    check_settings(cfg, len(train), tuple(train.features.shape[-2:]), k)

    descriptors, counts, n_empty = collect_descriptors(
        cfg, train.features, train_ds, backbone.patch_size, device,
        lambda it: logger.progress(it, desc="spectral segments"))
    weights = counts.float() if cfg.weight_by_size else torch.ones(len(counts))
    clusters = cluster_descriptors(descriptors, weights, k, n_init=cfg.n_init, max_iter=cfg.max_iter, seed=cfg.seed)
    logger.write(f"spectral: {len(descriptors)} segments from {len(train)} images ({n_empty} empty, skipped), "
                 f"K={k}, weighted inertia {clusters.inertia:.2f}")
    head = SpectralHead(clusters.centres, n_eigenvectors=cfg.n_eigenvectors, n_segments=cfg.n_segments,
                        segment_iters=cfg.segment_iters, spatial_sigma=cfg.spatial_sigma, alpha=cfg.alpha)
    metadata = export_metadata(cfg, METHOD, backbone, n_classes=val_ds.n_classes, n_clusters=k,
                               code_dim=backbone.feature_dim, resolution=val_ds.resolution,
                               n_segments=cfg.n_segments, n_eigenvectors=cfg.n_eigenvectors,
                               spatial_sigma=cfg.spatial_sigma)
    example = torch.from_numpy(np.asarray(val.features[:2], dtype=np.float32))
    finished = finish_run(cfg=cfg, method=METHOD, run_dir=run_dir, head=head, example_features=example,
                          metadata=metadata, val=val, val_flip=val_flip, val_ds=val_ds, logger=logger, is_main=True,
                          device=device, extra_metrics={"inertia": clusters.inertia, "n_clusters": k,
                                                        "n_segments_found": len(descriptors),
                                                        "n_empty_segments": n_empty})
    if cfg.n_figure_images > 0:
        segments_figure(run_dir / "figures" / "segments.png", head.cpu(), val, val_ds, cfg.n_figure_images)
    logger.close()
    return finished


if __name__ == "__main__":
    run_trainer(main, SpectralConfig)
