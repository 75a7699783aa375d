"""Train SegUnify on a frozen backbone.

    python -m segunify.train --config segunify/configs/potsdam3.yaml [--resume auto] [key=value ...]
    torchrun --standalone --nproc_per_node=N -m segunify.train --config ...
    make train-segunify DATASET=potsdam3

Setup (`main`): run directory, backbone, cached features (training view; validation image and flip), kNN file,
compressor + labeler + linear probe, one Adam each. Each step draws a batch of cached features and one kNN
partner per image, trains the compressor with the correspondence objective and the local centres with the
agreement loss and the k-means energy, then moves the global centres by EMA. Validation every `val_every` steps
writes checkpoints/last.pt; `shared.finish` exports the last step's head (global centres) and scores the reloaded
export on the image and its flip, then with CRF.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from segunify.config import SegUnifyConfig
from segunify.steps import (
    BatchStream,
    apply_gradients,
    build_modules,
    build_optimizers,
    draw_knn_partners,
    eval_head,
    set_learning_rates,
    start_centres,
    step_generator,
    step_losses,
)
from shared.backbone import build_backbone, snap_to_patch
from shared.checkpoint import load_checkpoint, make_checkpoint, resolve_resume, restore_checkpoint, save_checkpoint
from shared.cli import run_trainer
from shared.data import build_dataset
from shared.data.feature_cache import FeatureCache
from shared.data.knn import knn_from_cache
from shared.dist import barrier, distributed
from shared.evaluation import evaluate_head, score_summary
from shared.finish import FinishedRun, export_metadata, finish_run
from shared.logger import RunLogger
from shared.run_guard import StopSignal, check_finite
from shared.run_start import open_run
from shared.seed import seed_everything

METHOD = "segunify"
CONFIG_CLASS = SegUnifyConfig


@dataclass
class RunData:
    train_ds: object
    val_ds: object
    train: object  # CachedFeatures of the training view
    val: object
    val_flip: object
    knn: np.ndarray  # (N, k) neighbours, self first


def check_settings(cfg: SegUnifyConfig, n_images: int, grid: tuple[int, int], n_clusters: int) -> None:
    """One-sentence errors for settings these features cannot support."""
    if n_images < n_clusters:
        raise ValueError(f"the training split has {n_images} images, fewer than the {n_clusters} clusters "
                         "(n_classes + n_extra_clusters); use a larger train_split or fewer clusters.")
    tokens = min(cfg.batch_size, n_images) * grid[0] * grid[1]
    if n_clusters > tokens:
        raise ValueError(f"{n_clusters} clusters but a batch holds only {tokens} tokens (batch_size "
                         f"{min(cfg.batch_size, n_images)} x {grid[0]}x{grid[1]} patches at resolution "
                         f"{cfg.resolution}), so some clusters could never be used; raise resolution or batch_size, "
                         "or lower n_extra_clusters.")


def build_run_data(cfg: SegUnifyConfig, backbone, log) -> RunData:
    """Datasets, feature caches (built on first use) and the kNN file computed from the cached training features."""
    data_root = cfg.data_root or None
    res, val_res = (snap_to_patch(r, backbone.patch_size) for r in (cfg.resolution, cfg.val_resolution))
    if (res, val_res) != (cfg.resolution, cfg.val_resolution):
        log(f"resolutions snapped to multiples of patch {backbone.patch_size}: train {res}, val {val_res}")
    train_ds = build_dataset(cfg.dataset, cfg.train_split, data_root=data_root, resolution=res,
                             five_crop=cfg.five_crop)
    val_ds = build_dataset(cfg.dataset, cfg.val_split, data_root=data_root, resolution=val_res)
    if not val_ds.has_labels:
        raise ValueError(f"validation split {cfg.dataset}/{cfg.val_split} has no labels; set val_split to a "
                         "labelled split.")
    cache = FeatureCache(cfg.cache_dir)
    train = cache.get(backbone, train_ds)
    val, val_flip = cache.get(backbone, val_ds), cache.get(backbone, val_ds, flip=True)
    nns_dir = cfg.nns_dir or str(Path(cfg.cache_dir).parent / "nns")
    knn = knn_from_cache(train, k=min(30, len(train)), nns_dir=nns_dir)
    return RunData(train_ds, val_ds, train, val, val_flip, knn)


def read_batch(cached, indices: np.ndarray, device: torch.device,
               with_labels: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cached features (B, C, h, w) float32 and labels (B, R, R) or None, in the order of `indices`."""
    order = np.argsort(indices)  # memmaps read fastest in increasing order
    feats = np.empty((len(indices), *cached.features.shape[1:]), dtype=np.float32)
    feats[order] = cached.features[indices[order]]
    labels = None
    if with_labels and cached.labels is not None:
        labels = torch.from_numpy(np.asarray(cached.labels[indices], dtype=np.int64)).to(device)
    return torch.from_numpy(feats).to(device), labels


def validate(modules: nn.ModuleDict, data: RunData, cfg: SegUnifyConfig, n_classes: int) -> dict:
    """Flip-averaged scores of the current head (eval mode: batch norm on its running statistics)."""
    modules.eval()
    return evaluate_head(eval_head(modules, cfg.alpha), data.val, flipped=data.val_flip, n_classes=n_classes,
                         n_clusters=n_classes + cfg.n_extra_clusters, extra_policy=cfg.extra_policy,
                         batch_size=cfg.val_batch_size)


def save_state(path: Path, modules, optimizers, step: int, cfg: SegUnifyConfig) -> None:
    save_checkpoint(make_checkpoint(model=modules, optimizers=optimizers, step=step, config=cfg, method=METHOD), path)


def train_step(step: int, modules, compressor, optimizers, data: RunData, cfg: SegUnifyConfig, rank: int,
               stream: BatchStream, device: torch.device) -> dict:
    """One optimisation step; every draw is a function of (seed, rank, step). Returns the logs."""
    indices = stream.batch(step)
    partners = draw_knn_partners(data.knn, indices, cfg.knn_top, np.random.default_rng([cfg.seed, rank, step]))
    feats, labels = read_batch(data.train, indices, device, with_labels=True)
    feats_knn, _ = read_batch(data.train, partners, device, with_labels=False)
    set_learning_rates(cfg, optimizers, step)
    modules.train()
    total, logs = step_losses(modules, compressor, feats, feats_knn, labels, cfg,
                              step_generator(cfg.seed, rank, step, device))
    check_finite(total, step)
    apply_gradients(total, modules, optimizers)
    return logs


def main(cfg: SegUnifyConfig) -> FinishedRun:
    # open_run: the run directory, locked for the run, checked (fresh start / same settings on resume), config.yaml.
    with distributed(cfg.device) as ctx, open_run(cfg, METHOD, is_main=ctx.is_main) as run_dir:
        seed_everything(cfg.seed, cfg.deterministic)
        logger = RunLogger(run_dir, enabled=ctx.is_main)
        backbone = build_backbone(cfg.backbone, cfg.backbone_weights or None, features=cfg.features,
                                  force_float32=cfg.force_float32, device=ctx.device)
        if not backbone.pretrained:
            logger.write("NOTE: random backbone weights (backbone_weights=none): numbers are not meaningful.")
        data = build_run_data(cfg, backbone, logger.write)
        n_classes = data.train_ds.n_classes
        check_settings(cfg, len(data.train), tuple(data.train.features.shape[-2:]), n_classes + cfg.n_extra_clusters)

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank, whether or not the caches existed
        modules = build_modules(cfg, backbone.feature_dim, n_classes).to(ctx.device)
        if ctx.world_size > 1 and ctx.device.type == "cuda":  # batch statistics over all ranks' batches
            modules["compressor"] = nn.SyncBatchNorm.convert_sync_batchnorm(modules["compressor"])
        optimizers = build_optimizers(cfg, modules)
        compressor = DistributedDataParallel(modules["compressor"]) if ctx.world_size > 1 else modules["compressor"]
        start = 0
        resume_path = resolve_resume(cfg.resume, run_dir)
        if resume_path is not None:
            start = restore_checkpoint(load_checkpoint(resume_path), model=modules, optimizers=optimizers,
                                       method=METHOD)
            logger.write(f"resumed from {resume_path} at step {start}")
        elif cfg.centre_init == "kmeans":  # rank 0's first batch, which every rank can compute: the same centres
            first = BatchStream(len(data.train), cfg.batch_size, rank=0, world_size=ctx.world_size,
                                seed=cfg.seed).batch(0)
            start_centres(modules, read_batch(data.train, first, ctx.device, with_labels=False)[0], cfg)
        stream = BatchStream(len(data.train), cfg.batch_size, rank=ctx.rank, world_size=ctx.world_size, seed=cfg.seed)
        with StopSignal() as stop:
            for step in logger.progress(range(start, cfg.max_steps), total=cfg.max_steps - start, desc="segunify"):
                began = time.perf_counter()
                logs = train_step(step, modules, compressor, optimizers, data, cfg, ctx.rank, stream, ctx.device)
                done = step + 1
                if done % cfg.log_every == 0:
                    logger.scalars(done, {k: float(v) for k, v in logs.items()}, prefix="train")
                    logger.scalars(done, {"step_ms": (time.perf_counter() - began) * 1e3}, prefix="time")
                stopping = stop.sync()
                if done % cfg.val_every == 0 or done == cfg.max_steps:
                    scores = validate(modules, data, cfg, n_classes)
                    logger.scalars(done, score_summary(scores), prefix="val")
                    if ctx.is_main:
                        save_state(run_dir / "checkpoints" / "last.pt", modules, optimizers, done, cfg)
                        if cfg.select_by == "val_miou":
                            _keep_best(run_dir, modules, optimizers, done, cfg, scores["unsupervised"]["miou"])
                    logger.write(f"step {done}: val unsupervised mIoU {scores['unsupervised']['miou']:.2f}")
                    barrier()
                elif stopping:  # saved without the extra validation: it could enter the best-checkpoint choice
                    if ctx.is_main:
                        save_state(run_dir / "checkpoints" / "last.pt", modules, optimizers, done, cfg)
                    barrier()
                if stopping:
                    logger.write(f"stopped at step {done}; resume with --resume auto")
                    logger.close()
                    raise stop.interrupted(done)  # the CLI exits 143 (SIGTERM) / 130 (SIGINT): the run did not finish
        finished = finish(cfg, modules, data, backbone, n_classes, run_dir, logger, ctx.is_main, ctx.device)
        logger.close()
        return finished


def _keep_best(run_dir: Path, modules, optimizers, step: int, cfg: SegUnifyConfig, miou: float) -> None:
    """select_by=val_miou (uses labels, so only when asked for): keep the checkpoint with the best mIoU so far."""
    path = run_dir / "checkpoints" / "best.pt"
    previous = float(load_checkpoint(path).get("extra", {}).get("val_miou", -1.0)) if path.is_file() else -1.0
    if miou > previous:
        save_checkpoint(make_checkpoint(model=modules, optimizers=optimizers, step=step, config=cfg, method=METHOD,
                                        extra={"val_miou": miou}), path)


def finish(cfg: SegUnifyConfig, modules, data: RunData, backbone, n_classes: int, run_dir: Path, logger,
           is_main: bool, device: torch.device) -> FinishedRun:
    """Export the last step's head (or the best validated one with select_by=val_miou) and score the export."""
    barrier()
    best = run_dir / "checkpoints" / "best.pt"
    if cfg.select_by == "val_miou" and best.is_file():
        modules.load_state_dict(load_checkpoint(best)["model"])
    metadata = export_metadata(cfg, METHOD, backbone, n_classes=n_classes, n_clusters=n_classes + cfg.n_extra_clusters,
                               code_dim=cfg.code_dim, resolution=data.val_ds.resolution, steps=cfg.max_steps)
    example = torch.from_numpy(np.asarray(data.val.features[:2], dtype=np.float32))
    return finish_run(cfg=cfg, method=METHOD, run_dir=run_dir, head=eval_head(modules, cfg.alpha),
                      example_features=example, metadata=metadata, val=data.val, val_flip=data.val_flip,
                      val_ds=data.val_ds, logger=logger, is_main=is_main, device=device)


if __name__ == "__main__":
    run_trainer(main, SegUnifyConfig)
