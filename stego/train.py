"""Train STEGO on a frozen backbone.

    python -m stego.train --config stego/configs/cocostuff27.yaml [--resume auto] [key=value ...]
    torchrun --standalone --nproc_per_node=N -m stego.train --config ...

Setup (`main`): run directory, backbone, datasets, feature caches, kNN file, head + probes, optimizers.
Loop: each step draws a batch of cached features and one kNN partner per image, runs the head, and applies
the correspondence loss (head) and the two probe losses (probes, on the detached code), each part with its
own Adam. Validation every `val_every` steps keeps checkpoints/best.pt by unsupervised mIoU; checkpoints/last.pt
is written at each validation and at the end. Finally the best head is exported to export/segmenter.pt and
evaluated with and without CRF.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from shared.atomic_io import atomic_write_text
from shared.backbone import build_backbone, snap_to_patch
from shared.checkpoint import (
    gather_rng_states,
    load_checkpoint,
    make_checkpoint,
    resolve_resume,
    restore_checkpoint,
    save_checkpoint,
)
from shared.config import parse_args, save_resolved_config
from shared.data import build_dataset
from shared.data.feature_cache import FeatureCache
from shared.data.knn import load_or_compute_knn
from shared.dist import barrier, distributed
from shared.evaluation import evaluate_head
from shared.logger import RunLogger
from shared.run_guard import StopSignal, check_finite
from shared.seed import seed_everything
from stego.config import StegoConfig
from stego.export import export_stego, prediction_figure, segmenter_metadata
from stego.steps import (
    IndexStream,
    apply_gradients,
    build_modules,
    build_optimizers,
    head_outputs,
    knn_partners,
    step_losses,
)

METHOD = "stego"


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
    train = cache.get(backbone, train_ds) if cfg.use_cache else None
    val, val_flip = cache.get(backbone, val_ds), cache.get(backbone, val_ds, flip=True)
    knn = load_or_compute_knn(backbone, train_ds, k=min(30, len(train_ds)), nns_dir=cfg.nns_dir)
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


def validate(modules, data: RunData, cfg: StegoConfig, n_classes: int, crf: bool = False) -> dict:
    """Flip-averaged scores of the current head on the cached validation features (DDP-sharded).

    Puts `modules` in eval mode (the loop sets train mode again each step): `evaluate_head` cannot do it through
    the `head_outputs` closure, and dropout left on would score a randomly thinned head.
    """
    modules.eval()
    return evaluate_head(head_outputs(modules, cfg.alpha), data.val, flipped=data.val_flip, n_classes=n_classes,
                         n_clusters=n_classes + cfg.n_extra_clusters, extra_policy=cfg.extra_policy,
                         batch_size=cfg.val_batch_size, crf_images=data.val_ds if crf else None)


def score_summary(scores: dict) -> dict:
    """Flat {name: value} of the Acc / mIoU numbers present in an evaluate_head result."""
    out = {}
    for name in ("unsupervised", "linear", "crf_unsupervised", "crf_linear"):
        if scores.get(name):
            out[f"{name}/acc"], out[f"{name}/miou"] = scores[name]["acc"], scores[name]["miou"]
    return out


def save_state(path: Path, modules, optimizers, step: int, cfg: StegoConfig, best: float, rng: list[dict]) -> None:
    save_checkpoint(make_checkpoint(model=modules, optimizers=optimizers, step=step, config=cfg, method=METHOD,
                                    extra={"best_miou": best}, rng=rng), path)


def main(cfg: StegoConfig) -> dict:
    with distributed(cfg.device) as ctx:
        seed_everything(cfg.seed, cfg.deterministic)
        run_dir = Path(cfg.output_root) / METHOD / cfg.dataset / cfg.name
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved_config(cfg, run_dir)
        logger = RunLogger(run_dir, enabled=ctx.is_main)
        weights = None if cfg.backbone_weights == "" else cfg.backbone_weights
        backbone = build_backbone(cfg.backbone, weights, layer=cfg.feature_layer, force_float32=cfg.force_float32,
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
        start, best = 0, -1.0
        resume_path = resolve_resume(cfg.resume, run_dir)
        if resume_path is not None:
            state = load_checkpoint(resume_path)
            start = restore_checkpoint(state, model=modules, optimizers=optimizers, method=METHOD)
            best = float(state.get("extra", {}).get("best_miou", -1.0))
            logger.write(f"resumed from {resume_path} at step {start}")
        else:
            torch.manual_seed(cfg.seed + ctx.rank)  # ranks draw different dropout masks and grids

        stream = IndexStream(len(data.train_ds), cfg.batch_size, rank=ctx.rank, world_size=ctx.world_size,
                             seed=cfg.seed)
        ckpt_dir = run_dir / "checkpoints"
        with StopSignal() as stop:
            for step in logger.progress(range(start, cfg.max_steps), total=cfg.max_steps - start, desc="stego"):
                indices = stream.batch(step)
                # The partner draw depends only on (seed, rank, step), so resuming repeats it exactly.
                partners = knn_partners(data.knn, indices, cfg.knn_top,
                                        np.random.default_rng([cfg.seed, ctx.rank, step]))
                feats, labels = load_batch(data, backbone, indices, ctx.device, with_labels=True)
                feats_knn, _ = load_batch(data, backbone, partners, ctx.device, with_labels=False)
                modules.train()
                total, logs = step_losses(modules, head, feats, feats_knn, labels, cfg)
                check_finite(total, step)
                apply_gradients(total, modules, optimizers)
                done = step + 1
                if done % cfg.log_every == 0:
                    logger.scalars(done, {k: float(v) for k, v in logs.items()}, prefix="train")
                stopping = stop.sync()
                if done % cfg.val_every == 0 or done == cfg.max_steps or stopping:
                    scores = validate(modules, data, cfg, n_classes)
                    logger.scalars(done, score_summary(scores), prefix="val")
                    miou = scores["unsupervised"]["miou"]
                    rng = gather_rng_states()  # collective: every rank resumes its own dropout and grid stream
                    if ctx.is_main:
                        if miou > best:
                            best = miou
                            save_state(ckpt_dir / "best.pt", modules, optimizers, done, cfg, best, rng)
                        save_state(ckpt_dir / "last.pt", modules, optimizers, done, cfg, best, rng)
                    logger.write(f"step {done}: val unsupervised mIoU {miou:.2f} (best {best:.2f})")
                    barrier()
                if stopping:
                    logger.write(f"stopped at step {done}; resume with --resume auto")
                    logger.close()
                    return {"stopped_at": done}
        results = finish(cfg, modules, data, backbone, n_classes, run_dir, logger, ctx.is_main)
        logger.close()
        return results


def finish(cfg: StegoConfig, modules, data: RunData, backbone, n_classes: int, run_dir: Path, logger,
           is_main: bool) -> dict:
    """Reload the best head, export it, evaluate it with and without CRF, draw the prediction figure."""
    best_path = run_dir / "checkpoints" / "best.pt"
    barrier()
    if best_path.exists():
        modules.load_state_dict(load_checkpoint(best_path)["model"])
    modules.eval()
    scores = validate(modules, data, cfg, n_classes, crf=cfg.crf_at_end)
    summary = score_summary(scores) | {"extra_policy": cfg.extra_policy, "pretrained_backbone": backbone.pretrained}
    if is_main:
        metadata = segmenter_metadata(
            backbone=cfg.backbone, backbone_weights_id=backbone.weights_id, pretrained_backbone=backbone.pretrained,
            feature_layer=cfg.feature_layer, resolution=data.val_ds.resolution, n_classes=n_classes,
            n_clusters=n_classes + cfg.n_extra_clusters, code_dim=cfg.code_dim, dataset=cfg.dataset,
            extra_policy=cfg.extra_policy)
        export_stego(run_dir / "export" / "segmenter.pt", modules["head"], modules["cluster_probe"].centres,
                     cfg.alpha, modules["linear_probe"], metadata)
        prediction_figure(run_dir / "figures" / "predictions.png", head_outputs(modules, cfg.alpha),
                          data.val.features, data.val_ds, scores["unsupervised"]["mapping"], cfg.n_figure_images,
                          cfg.dataset)
        atomic_write_text(run_dir / "final_metrics.json", json.dumps(summary, indent=2))
        logger.scalars(cfg.max_steps, {k: v for k, v in summary.items() if isinstance(v, float)}, prefix="final")
        logger.write("final: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.items() if isinstance(v, float)))
        logger.write(f"exported {run_dir / 'export' / 'segmenter.pt'}")
    return summary


if __name__ == "__main__":
    main(parse_args(StegoConfig, sys.argv[1:]))
