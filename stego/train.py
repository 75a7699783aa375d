"""Train STEGO on a frozen backbone.

    python -m stego.train --config stego/configs/cocostuff27.yaml [--resume auto] [key=value ...]
    torchrun --standalone --nproc_per_node=N -m stego.train --config ...

Setup (`main`): run directory, backbone, datasets, feature caches, kNN file, head + probes, optimizers.
Loop: each step draws a batch of cached features and one kNN partner per image, runs the head, and applies
the correspondence loss (head) and the two probe losses (probes, on the detached code), each part with its
own Adam. With `micro_batches=M` a step accumulates M such batches, each a virtual rank (`stego.rank_streams`),
so W processes train what a W·M-rank job trains. Validation every `val_every` steps logs the scores and writes
checkpoints/last.pt (and, with `select_by=val_miou`, checkpoints/best.pt by validation mIoU, which uses labels).
Finally `shared.finish` exports the last step's head (or the best, with that option) to export/segmenter.pt2 and
scores the reloaded export.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

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
from shared.data.knn import knn_from_cache, load_or_compute_knn
from shared.dist import barrier, distributed
from shared.evaluation import evaluate_head, score_summary
from shared.finish import FinishedRun, export_metadata, finish_run
from shared.logger import RunLogger
from shared.run_guard import StopSignal, check_finite
from shared.run_start import open_run
from shared.seed import seed_everything
from stego.config import StegoConfig
from stego.rank_streams import RankStreams, check_job_size
from stego.steps import (
    IndexStream,
    MicroBatch,
    accumulate_gradients,
    build_modules,
    build_optimizers,
    eval_head,
    knn_partners,
    step_optimizers,
)

METHOD = "stego"
CONFIG_CLASS = StegoConfig


@dataclass
class RunData:
    """Everything the loop reads: datasets, caches (None when uncached), kNN table."""

    train_ds: object
    val_ds: object
    train: object | None  # CachedFeatures of the training view, None with use_cache=False
    val: object
    val_flip: object
    knn: np.ndarray


def build_run_data(cfg: StegoConfig, backbone, log) -> RunData:
    """Datasets, feature caches (built on first use) and the kNN file of the training split."""
    data_root = cfg.data_root or None
    res, val_res = snap_to_patch(cfg.resolution, backbone.patch_size), snap_to_patch(cfg.val_resolution,
                                                                                     backbone.patch_size)
    if (res, val_res) != (cfg.resolution, cfg.val_resolution):
        log(f"resolutions snapped to multiples of patch {backbone.patch_size}: train {res}, val {val_res}")
    train_ds = build_dataset(cfg.dataset, cfg.train_split, data_root=data_root, resolution=res,
                             five_crop=cfg.five_crop)
    val_ds = build_dataset(cfg.dataset, cfg.val_split, data_root=data_root, resolution=val_res)
    if not val_ds.has_labels:
        raise ValueError(f"validation split {cfg.dataset}/{cfg.val_split} has no labels; set val_split to a "
                         "labelled split.")
    cache = FeatureCache(cfg.cache_dir)
    verify = cfg.verify_cache
    train = cache.get(backbone, train_ds, verify=verify) if cfg.use_cache else None
    val, val_flip = cache.get(backbone, val_ds, verify=verify), cache.get(backbone, val_ds, flip=True, verify=verify)
    k = min(30, len(train_ds))
    nns_dir = cfg.nns_dir or str(Path(cfg.cache_dir).parent / "nns")
    # From the cached features when there are any (no second backbone pass over the split), keyed like the cache.
    knn = knn_from_cache(train, k=k, nns_dir=nns_dir) if train is not None else \
        load_or_compute_knn(backbone, train_ds, k=k, nns_dir=nns_dir)
    return RunData(train_ds, val_ds, train, val, val_flip, knn)


def load_batch(data: RunData, backbone, indices: np.ndarray, device: torch.device,
               with_labels: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features (B, C, h, w) and labels (B, R, R) of `indices`: from the cache, or computed on the images."""
    if data.train is not None:
        order = np.argsort(indices)  # memmaps read fastest in increasing order
        feats = np.empty((len(indices), *data.train.features.shape[1:]), dtype=np.float32)
        feats[order] = data.train.features[indices[order]]
        labels = None
        if with_labels and data.train.labels is not None:
            labels = torch.from_numpy(np.asarray(data.train.labels[indices], dtype=np.int64)).to(device)
        return torch.from_numpy(feats).to(device), labels
    items = [data.train_ds[int(i)] for i in indices]
    images = torch.stack([item["image"] for item in items]).to(device)
    labels = torch.stack([item["label"] for item in items]).long().to(device) if with_labels else None
    return backbone(images), labels  # (B, C, h, w), frozen, no grad


def load_micro_batch(data: RunData, backbone, cfg: StegoConfig, streams: list[IndexStream], first_rank: int,
                     step: int, device: torch.device, m: int) -> MicroBatch:
    """Features, kNN partners' features and labels of micro-batch `m` (virtual rank first_rank + m) at `step`."""
    indices = streams[m].batch(step)
    # The partner draw depends only on (seed, rank, step), so resuming repeats it exactly.
    partners = knn_partners(data.knn, indices, cfg.knn_top, np.random.default_rng([cfg.seed, first_rank + m, step]))
    feats, labels = load_batch(data, backbone, indices, device, with_labels=True)
    feats_knn, _ = load_batch(data, backbone, partners, device, with_labels=False)
    return feats, feats_knn, labels


def validate(modules, data: RunData, cfg: StegoConfig, n_classes: int, crf: bool = False) -> dict:
    """Flip-averaged scores of the current head on the cached validation features (DDP-sharded).

    Puts `modules` in eval mode (the loop sets train mode again each step): `evaluate_head` cannot do it through
    the `head_outputs` closure, and dropout left on would score a randomly thinned head.
    """
    modules.eval()
    return evaluate_head(eval_head(modules, cfg.alpha), data.val, flipped=data.val_flip, n_classes=n_classes,
                         n_clusters=n_classes + cfg.n_extra_clusters, extra_policy=cfg.extra_policy,
                         batch_size=cfg.val_batch_size, crf_images=data.val_ds if crf else None)


def save_state(path: Path, modules, optimizers, step: int, cfg: StegoConfig, best: float, rng: list[dict]) -> None:
    save_checkpoint(make_checkpoint(model=modules, optimizers=optimizers, step=step, config=cfg, method=METHOD,
                                    extra={"best_miou": best}, rng=rng), path)


def main(cfg: StegoConfig) -> FinishedRun:
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

        # Re-seeded: building a feature cache or the kNN file (rank 0 only under DDP) draws from the torch RNG, and
        # the init must be the same on every rank and whether or not the caches existed (the probes are not DDP).
        torch.manual_seed(cfg.seed)
        modules = build_modules(cfg, backbone.feature_dim, n_classes).to(ctx.device)
        optimizers = build_optimizers(cfg, modules)
        head = DistributedDataParallel(modules["head"]) if ctx.world_size > 1 else modules["head"]
        # Virtual ranks rank·M ... rank·M + M - 1 of a job of W·M (M = micro_batches): their random streams (seeded
        # seed + virtual rank, so ranks draw different dropout masks and grids) and their shares of the indices.
        rng_streams = RankStreams(cfg.seed, ctx.rank, cfg.micro_batches, ctx.device)
        n_ranks = ctx.world_size * cfg.micro_batches
        start, best = 0, -1.0
        resume_path = resolve_resume(cfg.resume, run_dir)
        if resume_path is not None:
            state = load_checkpoint(resume_path)
            check_job_size(state.get("rng"), resume_path, ctx.world_size, cfg.micro_batches)
            start = restore_checkpoint(state, model=modules, optimizers=optimizers, method=METHOD, restore_rng=False)
            rng_streams.restore(state["rng"])
            best = float(state.get("extra", {}).get("best_miou", -1.0))
            logger.write(f"resumed from {resume_path} at step {start}")

        index_streams = [IndexStream(len(data.train_ds), cfg.batch_size, rank=rng_streams.first + m,
                                     world_size=n_ranks, seed=cfg.seed) for m in range(cfg.micro_batches)]
        ckpt_dir = run_dir / "checkpoints"
        with StopSignal() as stop:
            for step in logger.progress(range(start, cfg.max_steps), total=cfg.max_steps - start, desc="stego"):
                began = time.perf_counter()
                modules.train()
                load = partial(load_micro_batch, data, backbone, cfg, index_streams, rng_streams.first, step,
                               ctx.device)
                logs = accumulate_gradients(modules, head, optimizers, load, cfg, rng_streams)
                check_finite(logs["loss/total"], step)  # before the step is applied: the weights stay the last good
                step_optimizers(modules, optimizers)
                done = step + 1
                if done % cfg.log_every == 0:
                    logger.scalars(done, {k: float(v) for k, v in logs.items()}, prefix="train")
                    logger.scalars(done, {"step_ms": (time.perf_counter() - began) * 1e3}, prefix="time")
                stopping = stop.sync()
                if done % cfg.val_every == 0 or done == cfg.max_steps:
                    scores = validate(modules, data, cfg, n_classes)
                    logger.scalars(done, score_summary(scores), prefix="val")
                    miou = scores["unsupervised"]["miou"]
                    # Collective: every (virtual) rank resumes its own dropout and grid stream.
                    rng = gather_rng_states(rng_streams.checkpoint_entries())
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
                    rng = gather_rng_states(rng_streams.checkpoint_entries())
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


def finish(cfg: StegoConfig, modules, data: RunData, backbone, n_classes: int, run_dir: Path, logger,
           is_main: bool) -> FinishedRun:
    """Export the last step's head (or, with select_by=val_miou, the best validated one) and score the export."""
    barrier()
    best_path = run_dir / "checkpoints" / "best.pt"
    if cfg.select_by == "val_miou" and best_path.exists():
        modules.load_state_dict(load_checkpoint(best_path)["model"])
    metadata = export_metadata(cfg, METHOD, backbone, n_classes=n_classes, n_clusters=n_classes + cfg.n_extra_clusters,
                               code_dim=cfg.code_dim, resolution=data.val_ds.resolution, steps=cfg.max_steps)
    example = torch.from_numpy(np.asarray(data.val.features[:2], dtype=np.float32))
    return finish_run(cfg=cfg, method=METHOD, run_dir=run_dir, head=eval_head(modules, cfg.alpha),
                      example_features=example, metadata=metadata, val=data.val, val_flip=data.val_flip,
                      val_ds=data.val_ds, logger=logger, is_main=is_main, device=next(modules.parameters()).device)


if __name__ == "__main__":
    run_trainer(main, StegoConfig)
