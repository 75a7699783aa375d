"""Train EAGLE on a frozen backbone.

    python -m eagle.train --config eagle/configs/cocostuff27.yaml [--resume auto] [key=value ...]
    torchrun --standalone --nproc_per_node=N -m eagle.train --config ...

Setup (`main`): run directory, backbone (keys of the last three blocks), datasets, feature caches, head +
projection + probes, one Adam per part. Loop: each step reads the cached features of x, the images (EiCue's
colour and the blurred view), runs the backbone live only on the images whose blur was drawn, then the head,
EiCue on both views, and the losses. Validation every `val_every` steps logs the scores and writes
checkpoints/last.pt (and, with `select_by=val_miou`, best.pt, which uses labels). Finally `shared.finish`
exports the last step's head (or the best, with that option) and scores the reloaded export.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from eagle.config import EagleConfig
from eagle.steps import (
    IndexStream,
    apply_gradients,
    augmented_features,
    blur_plan,
    build_modules,
    build_optimizers,
    eval_head,
    step_losses,
)
from shared.backbone import build_backbone, snap_to_patch
from shared.checkpoint import (
    gather_rng_states,
    load_checkpoint,
    make_checkpoint,
    resolve_resume,
    restore_checkpoint,
    save_checkpoint,
)
from shared.cli import run_trainer
from shared.data import build_dataset
from shared.data.feature_cache import FeatureCache
from shared.dist import barrier, distributed
from shared.evaluation import evaluate_head, score_summary
from shared.finish import FinishedRun, export_metadata, finish_run
from shared.logger import RunLogger
from shared.run_guard import StopSignal, check_finite
from shared.run_start import open_run
from shared.seed import seed_everything

METHOD = "eagle"
CONFIG_CLASS = EagleConfig


@dataclass
class RunData:
    """Everything the loop reads: datasets and the cached features of the training and validation splits."""

    train_ds: object
    val_ds: object
    train: object
    val: object
    val_flip: object


def build_run_data(cfg: EagleConfig, backbone, log) -> RunData:
    """Datasets and feature caches (built on first use, keyed by the keys descriptor)."""
    data_root = cfg.data_root or None
    patch = backbone.patch_size
    res, val_res = snap_to_patch(cfg.resolution, patch), snap_to_patch(cfg.val_resolution, patch)
    if (res, val_res) != (cfg.resolution, cfg.val_resolution):
        log(f"resolutions snapped to multiples of patch {patch}: train {res}, val {val_res}")
    train_ds = build_dataset(cfg.dataset, cfg.train_split, data_root=data_root, resolution=res,
                             five_crop=cfg.five_crop)
    val_ds = build_dataset(cfg.dataset, cfg.val_split, data_root=data_root, resolution=val_res)
    if not val_ds.has_labels:
        raise ValueError(f"validation split {cfg.dataset}/{cfg.val_split} has no labels; set val_split to a "
                         "labelled split.")
    cache = FeatureCache(cfg.cache_dir)
    train = cache.get(backbone, train_ds)
    val, val_flip = cache.get(backbone, val_ds), cache.get(backbone, val_ds, flip=True)
    return RunData(train_ds, val_ds, train, val, val_flip)


def load_batch(data: RunData, indices: np.ndarray,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Cached features (B, C, h, w), images (B, 3, R, R) read from the dataset, labels (B, R, R) or None.

    The images are read live: the blurred view needs them anyway, and EiCue's colour affinity reads them.
    """
    order = np.argsort(indices)  # memmaps read fastest in increasing order
    feats = np.empty((len(indices), *data.train.features.shape[1:]), dtype=np.float32)
    feats[order] = data.train.features[indices[order]]
    images = torch.stack([data.train_ds[int(i)]["image"] for i in indices])
    labels = None
    if data.train.labels is not None:
        labels = torch.from_numpy(np.asarray(data.train.labels[indices], dtype=np.int64)).to(device)
    return torch.from_numpy(feats).to(device), images.to(device), labels


def validate(modules, data: RunData, cfg: EagleConfig, n_classes: int) -> dict:
    """Flip-averaged scores of the current head on the cached validation features (modules put in eval mode)."""
    modules.eval()
    return evaluate_head(eval_head(modules, cfg.alpha), data.val, flipped=data.val_flip, n_classes=n_classes,
                         n_clusters=n_classes + cfg.n_extra_clusters, extra_policy=cfg.extra_policy,
                         batch_size=cfg.val_batch_size)


def save_state(path: Path, modules, optimizers, step: int, cfg: EagleConfig, best: float, rng: list[dict]) -> None:
    save_checkpoint(make_checkpoint(model=modules, optimizers=optimizers, step=step, config=cfg, method=METHOD,
                                    extra={"best_miou": best}, rng=rng), path)


def train_step(step: int, data: RunData, backbone, modules, head, optimizers, stream: IndexStream, cfg: EagleConfig,
               rank: int, device: torch.device) -> dict:
    """One optimisation step; returns the detached logs."""
    indices = stream.batch(step)
    feats, images, labels = load_batch(data, indices, device)
    apply, sigma = blur_plan(cfg, rank, step, len(indices))  # a function of (seed, rank, step)
    feats_aug = augmented_features(backbone, feats, images, apply, sigma)
    modules.train()
    total, logs = step_losses(modules, head, feats, feats_aug, images, labels, cfg, step)
    check_finite(total, step)
    apply_gradients(total, modules, optimizers)
    logs["eicue/blurred"] = torch.tensor(float(apply.sum()))
    return logs


def main(cfg: EagleConfig) -> FinishedRun:
    # open_run: the run directory, locked for the run, checked (fresh start / same settings on resume), config.yaml.
    with distributed(cfg.device) as ctx, open_run(cfg, METHOD, is_main=ctx.is_main) as run_dir:
        seed_everything(cfg.seed, cfg.deterministic)
        logger = RunLogger(run_dir, enabled=ctx.is_main)
        weights = None if cfg.backbone_weights == "" else cfg.backbone_weights
        backbone = build_backbone(cfg.backbone, weights, features=cfg.features, force_float32=cfg.force_float32,
                                  device=ctx.device)
        if not backbone.pretrained:
            logger.write("NOTE: random backbone weights (backbone_weights=none): numbers are not meaningful.")
        data = build_run_data(cfg, backbone, logger.write)
        n_classes = data.train_ds.n_classes

        # Re-seeded: building a cache (rank 0 only) draws from the torch RNG; the init must not depend on it.
        torch.manual_seed(cfg.seed)
        modules = build_modules(cfg, backbone.feature_dim, n_classes).to(ctx.device)
        optimizers = build_optimizers(cfg, modules)
        head = DistributedDataParallel(modules["head"]) if ctx.world_size > 1 else modules["head"]
        start, best = 0, -1.0
        resume_path = resolve_resume(cfg.resume, run_dir)
        if resume_path is not None:
            state = load_checkpoint(resume_path)
            start = restore_checkpoint(state, model=modules, optimizers=optimizers, method=METHOD)
            best = float(state.get("extra", {}).get("best_miou", -1.0))
            logger.write(f"resumed from {resume_path} at step {start}")
        else:
            torch.manual_seed(cfg.seed + ctx.rank)  # ranks draw different dropout masks, grids and negatives

        stream = IndexStream(len(data.train_ds), cfg.batch_size, rank=ctx.rank, world_size=ctx.world_size,
                             seed=cfg.seed)
        ckpt_dir = run_dir / "checkpoints"
        with StopSignal() as stop:
            for step in logger.progress(range(start, cfg.max_steps), total=cfg.max_steps - start, desc="eagle"):
                began = time.perf_counter()
                logs = train_step(step, data, backbone, modules, head, optimizers, stream, cfg, ctx.rank, ctx.device)
                done = step + 1
                if done % cfg.log_every == 0:
                    logger.scalars(done, {k: float(v) for k, v in logs.items()}, prefix="train")
                    logger.scalars(done, {"step_ms": (time.perf_counter() - began) * 1e3}, prefix="time")
                stopping = stop.sync()
                if done % cfg.val_every == 0 or done == cfg.max_steps:
                    scores = validate(modules, data, cfg, n_classes)
                    logger.scalars(done, score_summary(scores), prefix="val")
                    miou = scores["unsupervised"]["miou"]
                    rng = gather_rng_states()  # collective: every rank resumes its own random stream
                    if ctx.is_main:
                        if cfg.select_by == "val_miou" and miou > best:  # uses labels: only when asked for
                            best = miou
                            save_state(ckpt_dir / "best.pt", modules, optimizers, done, cfg, best, rng)
                        save_state(ckpt_dir / "last.pt", modules, optimizers, done, cfg, best, rng)
                    logger.write(f"step {done}: val unsupervised mIoU {miou:.2f}")
                    barrier()
                elif stopping:
                    # Saved without the extra validation: it would let the stop step enter the best-checkpoint
                    # choice, which an uninterrupted run never makes there.
                    rng = gather_rng_states()
                    if ctx.is_main:
                        save_state(ckpt_dir / "last.pt", modules, optimizers, done, cfg, best, rng)
                    barrier()
                if stopping:
                    logger.write(f"stopped at step {done}; resume with --resume auto")
                    logger.close()
                    raise stop.interrupted(done)  # the CLI exits 143 (SIGTERM) / 130 (SIGINT): the run did not finish
        results = finish(cfg, modules, data, backbone, n_classes, run_dir, logger, ctx.is_main)
        logger.close()
        return results


def finish(cfg: EagleConfig, modules, data: RunData, backbone, n_classes: int, run_dir: Path, logger,
           is_main: bool) -> FinishedRun:
    """Export the last step's head (or, with select_by=val_miou, the best validated one) and score the export."""
    barrier()
    best_path = run_dir / "checkpoints" / "best.pt"
    if cfg.select_by == "val_miou" and best_path.exists():
        modules.load_state_dict(load_checkpoint(best_path)["model"])
    metadata = export_metadata(cfg, METHOD, backbone, n_classes=n_classes, n_clusters=n_classes + cfg.n_extra_clusters,
                               code_dim=cfg.code_dim, resolution=data.val_ds.resolution, steps=cfg.max_steps,
                               alpha=cfg.alpha, colour=cfg.colour)
    example = torch.from_numpy(np.asarray(data.val.features[:2], dtype=np.float32))
    return finish_run(cfg=cfg, method=METHOD, run_dir=run_dir, head=eval_head(modules, cfg.alpha),
                      example_features=example, metadata=metadata, val=data.val, val_flip=data.val_flip,
                      val_ds=data.val_ds, logger=logger, is_main=is_main, device=next(modules.parameters()).device)


if __name__ == "__main__":
    run_trainer(main, EagleConfig)
