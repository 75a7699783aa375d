"""Train PU-SegNet (the SNGP head) on cached features from a frozen base segmenter's pseudo-labels.

    python -m pusegnet.train --config pusegnet/configs/cocostuff27.yaml base_segmenter=<segmenter.pt2> [key=value]
    make train-puis DATASET=cocostuff27 BASE=runs/stego/cocostuff27/default/export/segmenter.pt2

Setup (`main`): run directory, backbone, datasets, feature caches, the base segmenter (checked against our
backbone and feature kind) and its cached pseudo-labels, head + probe, optimizers, resume. Loop: each step reads
a batch of cached features with their pseudo-labels and confidences, applies the confidence-weighted CE and the
similarity loss, and (in the last epoch, or always with the momentum variant) adds a pixel subsample to the
Laplace precision. After the loop the precision is inverted once; `shared.finish` exports and scores the head,
and `pusegnet.report` adds the calibration block beside the base segmenter's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from pusegnet.config import PusegnetConfig
from pusegnet.pseudo_labels import PseudoLabels, load_or_compute
from pusegnet.report import calibration_block
from pusegnet.steps import (
    IndexStream,
    apply_gradients,
    build_modules,
    build_optimizers,
    eval_head,
    precision_window_start,
    step_generator,
    step_losses,
    update_precision,
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
from shared.run_dir import RunDirError, check_base_compatible, resolve_base_segmenter
from shared.run_guard import StopSignal, check_finite
from shared.run_start import open_run
from shared.seed import seed_everything
from shared.segmenter import load as load_segmenter

METHOD = "pusegnet"
CONFIG_CLASS = PusegnetConfig


@dataclass
class RunData:
    train_ds: object
    val_ds: object
    train: object  # CachedFeatures of the training view
    val: object
    val_flip: object
    base: object  # the loaded base segmenter
    base_path: Path
    pseudo: PseudoLabels


def build_run_data(cfg: PusegnetConfig, backbone, device, log) -> RunData:
    """Datasets, feature caches, the checked base segmenter and the pseudo-labels of the training split."""
    if not cfg.base_segmenter.strip():
        raise RunDirError("base_segmenter is empty; PU-SegNet trains on another method's export: pass "
                          "base_segmenter=<segmenter.pt2>, a run directory, or run:stego.")
    base_path = resolve_base_segmenter(cfg.base_segmenter, output_root=cfg.output_root, dataset=cfg.dataset,
                                       name=cfg.name)
    res, val_res = (snap_to_patch(r, backbone.patch_size) for r in (cfg.resolution, cfg.val_resolution))
    train_ds = build_dataset(cfg.dataset, cfg.train_split, data_root=cfg.data_root or None, resolution=res,
                             five_crop=cfg.five_crop)
    val_ds = build_dataset(cfg.dataset, cfg.val_split, data_root=cfg.data_root or None, resolution=val_res)
    if not val_ds.has_labels:
        raise ValueError(f"validation split {cfg.dataset}/{cfg.val_split} has no labels; set val_split to a "
                         "labelled split.")
    check_base_compatible(base_path, backbone, train_ds.n_classes)
    base = load_segmenter(base_path, map_location=device)
    cache = FeatureCache(cfg.cache_dir)
    train = cache.get(backbone, train_ds)
    val, val_flip = cache.get(backbone, val_ds), cache.get(backbone, val_ds, flip=True)
    directory = Path(cfg.pseudo_label_dir or Path(cfg.cache_dir).parent / "pseudo_labels")
    pseudo = load_or_compute(base, base_path, train, directory, batch_size=cfg.val_batch_size, device=device)
    log(f"base segmenter {base_path} ({base.metadata['method']}, {base.metadata['n_clusters']} clusters); "
        f"pseudo-labels {pseudo.path}")
    return RunData(train_ds, val_ds, train, val, val_flip, base, base_path, pseudo)


def load_batch(data: RunData, indices: np.ndarray, device) -> tuple[torch.Tensor, ...]:
    """Features (B, C, h, w), pseudo-labels and confidences (B, h, w), labels (B, R, R) or None."""
    order = np.argsort(indices)  # memmaps read fastest in increasing order
    feats = np.empty((len(indices), *data.train.features.shape[1:]), dtype=np.float32)
    feats[order] = data.train.features[indices[order]]
    pseudo = torch.from_numpy(data.pseudo.labels[indices].astype(np.int64)).to(device)
    confidence = torch.from_numpy(data.pseudo.confidence[indices].astype(np.float32)).to(device)
    labels = None
    if data.train.labels is not None:
        labels = torch.from_numpy(np.asarray(data.train.labels[indices], dtype=np.int64)).to(device)
    return torch.from_numpy(feats).to(device), pseudo, confidence, labels


def validate(modules, data: RunData, cfg: PusegnetConfig, n_classes: int, n_clusters: int) -> dict:
    """Flip-averaged scores of the current head (covariance from the current precision)."""
    modules.eval()
    if cfg.sngp:
        modules["head"].laplace.finalize()
    return evaluate_head(eval_head(modules, cfg), data.val, flipped=data.val_flip, n_classes=n_classes,
                         n_clusters=n_clusters, extra_policy=cfg.extra_policy, batch_size=cfg.val_batch_size)


def train_loop(cfg, ctx, modules, optimizers, data: RunData, start: int, logger, run_dir: Path) -> None:
    """Steps ``start`` .. ``max_steps``; on a signal saves last.pt and raises RunInterrupted."""
    head = DistributedDataParallel(modules["head"]) if ctx.world_size > 1 else modules["head"]
    stream = IndexStream(len(data.train_ds), cfg.batch_size, rank=ctx.rank, world_size=ctx.world_size, seed=cfg.seed)
    window = precision_window_start(cfg.max_steps, stream.steps_per_epoch)
    n_classes, n_clusters = data.train_ds.n_classes, int(data.base.metadata["n_clusters"])
    with StopSignal() as stop:
        for step in logger.progress(range(start, cfg.max_steps), total=cfg.max_steps - start, desc=METHOD):
            began = time.perf_counter()
            generator = step_generator(cfg.seed, ctx.rank, step)
            feats, pseudo, confidence, labels = load_batch(data, stream.batch(step), ctx.device)
            modules.train()
            total, logs, out = step_losses(modules, head, feats, pseudo, confidence, labels, cfg, generator)
            check_finite(total, step)
            apply_gradients(total, modules, optimizers)
            if cfg.sngp and (cfg.precision_mode == "momentum" or step >= window):
                if cfg.precision_mode == "last_epoch" and step == window:
                    modules["head"].laplace.reset()
                update_precision(modules["head"], out, cfg, generator)
            done = step + 1
            if done % cfg.log_every == 0:
                logger.scalars(done, {k: float(v) for k, v in logs.items()}, prefix="train")
                logger.scalars(done, {"step_ms": (time.perf_counter() - began) * 1e3}, prefix="time")
            stopping = stop.sync()
            validating = done % cfg.val_every == 0 or done == cfg.max_steps
            if validating:
                scores = validate(modules, data, cfg, n_classes, n_clusters)
                logger.scalars(done, score_summary(scores), prefix="val")
            if validating or stopping:  # a stop saves without the extra validation (it finalizes the precision)
                rng = gather_rng_states()
                if ctx.is_main:
                    save_checkpoint(make_checkpoint(model=modules, optimizers=optimizers, step=done, config=cfg,
                                                    method=METHOD, rng=rng), run_dir / "checkpoints" / "last.pt")
                if validating:
                    logger.write(f"step {done}: val unsupervised mIoU {scores['unsupervised']['miou']:.2f}")
                barrier()
            if stopping:
                logger.write(f"stopped at step {done}; resume with --resume auto")
                logger.close()
                raise stop.interrupted(done)  # the CLI exits 143 (SIGTERM) / 130 (SIGINT): the run did not finish


def main(cfg: PusegnetConfig) -> FinishedRun:
    if cfg.select_by != "last":
        raise ValueError(f"select_by={cfg.select_by!r}: PU-SegNet exports the last step's head (its Laplace "
                         "posterior belongs to the final weights); use select_by=last.")
    # open_run: the run directory, locked for the run, checked (fresh start / same settings on resume), config.yaml.
    with (distributed(cfg.device) as ctx,
          open_run(cfg, METHOD, is_main=ctx.is_main, uses_base_segmenter=True) as run_dir):
        seed_everything(cfg.seed, cfg.deterministic)
        logger = RunLogger(run_dir, enabled=ctx.is_main)
        backbone = build_backbone(cfg.backbone, cfg.backbone_weights or None, features=cfg.features,
                                  force_float32=cfg.force_float32, device=ctx.device)
        if not backbone.pretrained:
            logger.write("NOTE: random backbone weights (backbone_weights=none): numbers are not meaningful.")
        data = build_run_data(cfg, backbone, ctx.device, logger.write)
        n_clusters = int(data.base.metadata["n_clusters"])
        torch.manual_seed(cfg.seed)  # the same init whether or not the caches existed, and on every rank
        modules = build_modules(cfg, backbone.feature_dim, n_clusters, data.train_ds.n_classes).to(ctx.device)
        optimizers = build_optimizers(cfg, modules)
        start = 0
        resume_path = resolve_resume(cfg.resume, run_dir)
        if resume_path is not None:
            start = restore_checkpoint(load_checkpoint(resume_path), model=modules, optimizers=optimizers,
                                       method=METHOD)
            logger.write(f"resumed from {resume_path} at step {start}")
        else:
            torch.manual_seed(cfg.seed + ctx.rank)  # ranks draw different dropout masks
        train_loop(cfg, ctx, modules, optimizers, data, start, logger, run_dir)
        results = finish(cfg, modules, data, backbone, run_dir, logger, ctx)
        logger.close()
        return results


def finish(cfg: PusegnetConfig, modules, data: RunData, backbone, run_dir: Path, logger, ctx) -> FinishedRun:
    """Invert the precision once, export and score the head, then the calibration block beside the base's."""
    barrier()
    modules.eval()
    if cfg.sngp:
        modules["head"].converge_spectral_norm()
        modules["head"].laplace.finalize()
    n_clusters = int(data.base.metadata["n_clusters"])
    metadata = export_metadata(cfg, METHOD, backbone, n_classes=data.val_ds.n_classes, n_clusters=n_clusters,
                               code_dim=cfg.hidden_dim, resolution=data.val_ds.resolution, probabilistic=cfg.sngp,
                               steps=cfg.max_steps, base_segmenter=str(data.base_path),
                               base_method=str(data.base.metadata["method"]))
    example = torch.from_numpy(np.asarray(data.val.features[:2], dtype=np.float32))
    finished = finish_run(cfg=cfg, method=METHOD, run_dir=run_dir, head=eval_head(modules, cfg),
                          example_features=example, metadata=metadata, val=data.val, val_flip=data.val_flip,
                          val_ds=data.val_ds, logger=logger, is_main=ctx.is_main, device=ctx.device)
    calibration_block(finished, data.base, data.val, data.val_flip, data.val_ds, run_dir, cfg, logger,
                      is_main=ctx.is_main, device=ctx.device)
    return finished


if __name__ == "__main__":
    run_trainer(main, PusegnetConfig)
