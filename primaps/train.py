"""Train PriMaPs-EM on a frozen backbone, on its raw features or "+SotA" on another method's exported code.

    python -m primaps.train --config primaps/configs/cocostuff27.yaml [--resume auto] [key=value ...]
    python -m primaps.train --config primaps/configs/cocostuff27.yaml base_segmenter=runs/stego/cocostuff27/default
    make train-primaps DATASET=cocostuff27 [BASE=<segmenter.pt2>]

Setup: run directory, backbone, datasets and feature caches, the base segmenter, the pseudo-masks of every
training image (computed once in a process pool, cached beside the feature cache), PCA initialisation of θ_M and
θ_R. Loop: `warmup_steps` of hard cosine k-means on θ_M, then the EM: θ_R <- θ_M, and each step the E-step (majority
vote of θ_M inside every pseudo-mask) and the M-step (focal cross-entropy of θ_R on the second view), θ_M <- EMA(θ_R)
every `ema_every` steps; the linear probe trains throughout as a diagnostic. Finally `shared.finish` exports
θ_M (with the base segmenter inside, for "+SotA") and scores the reloaded export.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from primaps.config import PrimapsConfig
from primaps.data import RunData, build_run_data, load_batch, pca_vectors, student_code
from primaps.steps import (
    Schedule,
    batch_indices,
    build_modules,
    build_optimizers,
    em_step,
    eval_head,
    maybe_ema_,
    pca_init_,
    start_em_,
    step_generator,
    warmup_step,
)
from shared.backbone import build_backbone
from shared.checkpoint import (
    gather_rng_states,
    load_checkpoint,
    make_checkpoint,
    resolve_resume,
    restore_checkpoint,
    save_checkpoint,
)
from shared.cli import run_trainer
from shared.dist import all_reduce_mean, barrier, distributed
from shared.evaluation import evaluate_head, score_summary
from shared.finish import FinishedRun, export_metadata, finish_run
from shared.logger import RunLogger
from shared.run_guard import StopSignal, check_finite
from shared.run_start import open_run
from shared.seed import seed_everything
from shared.viz import colorize, default_palette, save_grid, to_uint8_image

METHOD = "primaps"
CONFIG_CLASS = PrimapsConfig


def validate(modules, data: RunData, cfg: PrimapsConfig, n_classes: int, which: str = "theta_m") -> dict:
    modules.eval()
    return evaluate_head(eval_head(modules, cfg.alpha, data.base, which), data.val, flipped=data.val_flip,
                         n_classes=n_classes, n_clusters=n_classes, extra_policy=cfg.extra_policy,
                         batch_size=cfg.val_batch_size)


def apply_gradients(total: torch.Tensor, modules, optimizers: dict, parts: tuple[str, ...]) -> None:
    """Backward, gradients averaged over ranks (the modules are not DDP-wrapped), one step of each of `parts`."""
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    total.backward()
    for name in parts:
        for param in modules[name].parameters():
            if param.grad is not None:
                all_reduce_mean(param.grad)
        optimizers[name].step()


def pseudo_mask_figure(path: Path, data: RunData, n: int) -> None:
    """Training images beside their pseudo-masks (mask ids in arbitrary colours, background black)."""
    palette = np.asarray(default_palette(256))
    rows = []
    for i in range(min(n, len(data.train_ds))):
        masks = data.masks[i].astype(np.int64) - 1  # background -> -1 (black)
        rows.append([to_uint8_image(data.train_ds[i]["image"]), colorize(masks, palette)])
    if rows:
        save_grid(rows, path, titles=["image", "PriMaPs pseudo-masks"])


def train_step(step: int, schedule: Schedule, modules, optimizers, data: RunData, cfg: PrimapsConfig, backbone,
               ctx) -> dict:
    """One step: a warm-up (k-means) step before `schedule.warmup_steps`, an EM step after. Returns the logs."""
    indices = batch_indices(step, len(data.train_ds), cfg.batch_size, seed=cfg.seed, rank=ctx.rank,
                            world_size=ctx.world_size)
    gen = step_generator(cfg.seed, ctx.rank, step)
    batch = load_batch(data, cfg, backbone, indices, gen, ctx.device)
    modules.train()
    if step < schedule.warmup_steps:
        total, logs = warmup_step(modules, batch.code, batch.labels, cfg)
        parts = ("theta_m", "linear_probe")
    else:
        if step == schedule.warmup_steps:
            start_em_(modules)
        second = student_code(data, cfg, backbone, batch, gen, ctx.device)
        total, logs = em_step(modules, batch.code, second, batch.masks, batch.labels, cfg)
        parts = ("theta_r", "linear_probe")
    check_finite(total, step)
    apply_gradients(total, modules, optimizers, parts)
    if step >= schedule.warmup_steps:
        decay = maybe_ema_(modules, step + 1 - schedule.warmup_steps, cfg)
        if decay is not None:
            logs["ema/decay"] = torch.tensor(decay)
    return logs


def main(cfg: PrimapsConfig) -> FinishedRun:
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
        n_classes = data.train_ds.n_classes
        if ctx.is_main:
            pseudo_mask_figure(run_dir / "figures" / "pseudo_masks.png", data, cfg.n_figure_images)
        schedule = Schedule.of(cfg, len(data.train_ds), ctx.world_size)

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank, whether or not the caches existed
        modules = build_modules(data.code_dim, n_classes).to(ctx.device)
        optimizers = build_optimizers(cfg, modules)
        start = 0
        resume_path = resolve_resume(cfg.resume, run_dir)
        if resume_path is not None:
            start = restore_checkpoint(load_checkpoint(resume_path), model=modules, optimizers=optimizers,
                                       method=METHOD)
            logger.write(f"resumed from {resume_path} at step {start}")
        else:
            pca_init_(modules, pca_vectors(data, cfg, ctx.device).to(ctx.device))
        logger.write(f"{schedule.warmup_steps} warm-up steps, {schedule.total_steps} in all "
                     f"({schedule.steps_per_epoch} per epoch)")
        with StopSignal() as stop:
            for step in logger.progress(range(start, schedule.total_steps), total=schedule.total_steps - start,
                                        desc="primaps"):
                began = time.perf_counter()
                logs = train_step(step, schedule, modules, optimizers, data, cfg, backbone, ctx)
                done = step + 1
                if done % cfg.log_every == 0:
                    logger.scalars(done, {k: float(v) for k, v in logs.items()}, prefix="train")
                    logger.scalars(done, {"step_ms": (time.perf_counter() - began) * 1e3}, prefix="time")
                stopping = stop.sync()
                if done % cfg.val_every == 0 or done == schedule.total_steps:
                    checkpoint(done, modules, optimizers, data, cfg, n_classes, run_dir, logger, ctx)
                elif stopping:  # saved without the extra validation (it could change the best checkpoint)
                    save_last(done, modules, optimizers, cfg, run_dir, ctx)
                if stopping:
                    logger.write(f"stopped at step {done}; resume with --resume auto")
                    logger.close()
                    raise stop.interrupted(done)  # the CLI exits 143 (SIGTERM) / 130 (SIGINT): the run did not finish
        results = finish(cfg, modules, data, backbone, n_classes, schedule, run_dir, logger, ctx)
        logger.close()
        return results


def checkpoint(done: int, modules, optimizers, data: RunData, cfg: PrimapsConfig, n_classes: int, run_dir: Path,
               logger, ctx) -> None:
    """Validate θ_M (and θ_R, a diagnostic), write checkpoints/last.pt (and best.pt with select_by=val_miou)."""
    scores = validate(modules, data, cfg, n_classes)
    logger.scalars(done, score_summary(scores), prefix="val")
    logger.scalars(done, {"miou": validate(modules, data, cfg, n_classes, "theta_r")["unsupervised"]["miou"]},
                   prefix="val_theta_r")
    miou = scores["unsupervised"]["miou"]
    rng = gather_rng_states()
    if ctx.is_main:
        ckpt_dir = run_dir / "checkpoints"
        best = -1.0
        if (ckpt_dir / "last.pt").is_file():
            best = float(load_checkpoint(ckpt_dir / "last.pt").get("extra", {}).get("best_miou", -1.0))
        if cfg.select_by == "val_miou" and miou > best:  # uses labels: only when asked for
            best = miou
            save_checkpoint(make_checkpoint(model=modules, optimizers=optimizers, step=done, config=cfg,
                                            method=METHOD, extra={"best_miou": best}, rng=rng), ckpt_dir / "best.pt")
        save_checkpoint(make_checkpoint(model=modules, optimizers=optimizers, step=done, config=cfg, method=METHOD,
                                        extra={"best_miou": best}, rng=rng), ckpt_dir / "last.pt")
    logger.write(f"step {done}: val unsupervised mIoU {miou:.2f}")
    barrier()


def save_last(done: int, modules, optimizers, cfg: PrimapsConfig, run_dir: Path, ctx) -> None:
    """checkpoints/last.pt at a stop step, without validating (best_miou carried over from the previous last.pt)."""
    rng = gather_rng_states()
    if ctx.is_main:
        last = run_dir / "checkpoints" / "last.pt"
        best = float(load_checkpoint(last).get("extra", {}).get("best_miou", -1.0)) if last.is_file() else -1.0
        save_checkpoint(make_checkpoint(model=modules, optimizers=optimizers, step=done, config=cfg, method=METHOD,
                                        extra={"best_miou": best}, rng=rng), last)
    barrier()


def finish(cfg: PrimapsConfig, modules, data: RunData, backbone, n_classes: int, schedule: Schedule, run_dir: Path,
           logger, ctx) -> FinishedRun:
    barrier()
    best_path = run_dir / "checkpoints" / "best.pt"
    if cfg.select_by == "val_miou" and best_path.exists():
        modules.load_state_dict(load_checkpoint(best_path)["model"])
    metadata = export_metadata(cfg, METHOD, backbone, n_classes=n_classes, n_clusters=n_classes,
                               code_dim=data.code_dim, resolution=data.val_ds.resolution,
                               steps=schedule.total_steps, warmup_steps=schedule.warmup_steps,
                               base_segmenter=data.base_path, base_sha256=data.base_sha256 or "")
    example = torch.from_numpy(np.asarray(data.val.features[:2], dtype=np.float32))
    return finish_run(cfg=cfg, method=METHOD, run_dir=run_dir, head=eval_head(modules, cfg.alpha, data.base),
                      example_features=example, metadata=metadata, val=data.val, val_flip=data.val_flip,
                      val_ds=data.val_ds, logger=logger, is_main=ctx.is_main, device=ctx.device)


if __name__ == "__main__":
    run_trainer(main, PrimapsConfig)
