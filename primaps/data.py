"""What a PriMaPs-EM run reads: datasets, feature caches, the optional "+SotA" base segmenter, the pseudo-masks,
and per-step batches (cached first view, optional live second view)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from primaps import augment
from primaps.config import PrimapsConfig
from primaps.pseudo_masks import MaskParams, file_sha256, key_fields, load_or_compute
from shared.backbone import snap_to_patch
from shared.data import build_dataset
from shared.data.feature_cache import FeatureCache
from shared.dist import barrier, get_rank
from shared.run_dir import check_base_compatible, resolve_base_segmenter
from shared.segmenter import load as load_segmenter


@dataclass
class RunData:
    train_ds: object
    val_ds: object
    train: object  # CachedFeatures of the training view
    train_flip: object | None  # of its horizontal flip (features of the flipped images)
    val: object
    val_flip: object
    masks: np.ndarray  # (N, R, R) uint8 pseudo-masks, 0 = background
    base: torch.nn.Module | None  # the "+SotA" base segmenter, None on raw features
    base_path: str
    base_sha256: str | None
    code_dim: int


def code_of(data: RunData, features: torch.Tensor) -> torch.Tensor:
    """The space the EM runs in: the base segmenter's code, or the features themselves. (B, D, h, w)."""
    if data.base is None:
        return features
    with torch.no_grad():
        return data.base(features)["code"]


def _base(cfg: PrimapsConfig, backbone, n_classes: int, device) -> tuple[torch.nn.Module | None, str, str | None]:
    path = resolve_base_segmenter(cfg.base_segmenter, output_root=cfg.output_root, dataset=cfg.dataset, name=cfg.name)
    if path is None:
        return None, "", None
    check_base_compatible(path, backbone)  # its code, not its clusters, is used: any number of clusters will do
    return load_segmenter(path, map_location=device), str(path), file_sha256(path)


def build_run_data(cfg: PrimapsConfig, backbone, device, log) -> RunData:
    """Datasets, caches (built on first use), the base segmenter and the pseudo-masks (rank 0 builds them)."""
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
    train_flip = cache.get(backbone, train_ds, flip=True) if cfg.hflip else None
    val, val_flip = cache.get(backbone, val_ds), cache.get(backbone, val_ds, flip=True)
    base, base_path, base_sha = _base(cfg, backbone, train_ds.n_classes, device)
    data = RunData(train_ds, val_ds, train, train_flip, val, val_flip, np.zeros(0, np.uint8), base, base_path,
                   base_sha, 0)
    data.code_dim = int(code_of(data, _features(train, [0], device)).shape[1])
    data.masks = _pseudo_masks(cfg, data, device, log)
    return data


def _pseudo_masks(cfg: PrimapsConfig, data: RunData, device, log) -> np.ndarray:
    params = MaskParams(cfg.threshold, cfg.coverage, cfg.patience, cfg.gain)
    fields = key_fields(data.train.key, data.train_ds, params, data.base_sha256)
    pseudo_dir = cfg.pseudo_dir or str(Path(cfg.cache_dir).parent / "primaps")

    def features_of(index: int) -> np.ndarray:
        return code_of(data, _features(data.train, [index], device))[0].float().cpu().numpy()

    def build(progress: bool):
        return load_or_compute(pseudo_dir, fields, data.train_ds, features_of, params, workers=cfg.pseudo_workers,
                               timeout_s=cfg.pseudo_timeout_s, progress=progress, log=log)

    if get_rank() == 0:
        build(True)
    barrier()
    return build(False)  # every rank opens (and validates) the cache rank 0 wrote


def _features(cached, indices, device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(cached.features[np.asarray(indices)], dtype=np.float32)).to(device)


@dataclass
class Batch:
    code: torch.Tensor  # (B, D, h, w) the first view (E-step, warm-up, linear probe)
    labels: torch.Tensor | None  # (B, R, R), -1 ignore (the linear probe only)
    masks: torch.Tensor  # (B, R, R) int64 pseudo-masks
    images: list  # the first view's images when they were loaded, else []


def load_batch(data: RunData, cfg: PrimapsConfig, backbone, indices: np.ndarray, gen: torch.Generator,
               device) -> Batch:
    """The step's first view: horizontal flips drawn from `gen` (cached flipped features), or with
    `photometric_augs` the augmented images through the live backbone."""
    flips = (torch.rand(len(indices), generator=gen) < 0.5).numpy() if cfg.hflip else np.zeros(len(indices), bool)
    feats = _features(data.train, indices, device)
    if flips.any():
        feats[torch.from_numpy(flips)] = _features(data.train_flip, indices[flips], device)
    masks = torch.from_numpy(np.asarray(data.masks[indices], dtype=np.int64))
    labels = None
    if data.train.labels is not None:
        labels = torch.from_numpy(np.asarray(data.train.labels[indices], dtype=np.int64))
    flip_t = torch.from_numpy(flips)
    masks[flip_t] = masks[flip_t].flip(-1)
    if labels is not None:
        labels[flip_t] = labels[flip_t].flip(-1)
        labels = labels.to(device)
    images = []
    if cfg.photometric_augs or cfg.student_augs:
        images = torch.stack([data.train_ds[int(i)]["image"] for i in indices])
        images[flip_t] = images[flip_t].flip(-1)
        if cfg.photometric_augs:
            images = augment.photometric_view(images, gen)
            feats = backbone(images.to(device))
    return Batch(code_of(data, feats), labels, masks.to(device), images)


def student_code(data: RunData, cfg: PrimapsConfig, backbone, batch: Batch, gen: torch.Generator,
                 device) -> torch.Tensor:
    """The M-step's second view: the student augmentations through the live backbone, or the first view."""
    if not cfg.student_augs:
        return batch.code
    return code_of(data, backbone(augment.student_view(batch.images, gen).to(device)))


def pca_vectors(data: RunData, cfg: PrimapsConfig, device) -> torch.Tensor:
    """The code vectors (N * h * w, D) of `pca_batches * batch_size` training images drawn with the seed."""
    n = len(data.train)
    count = min(n, cfg.pca_batches * cfg.batch_size)
    chosen = np.sort(np.random.default_rng([cfg.seed, 7]).choice(n, size=count, replace=False))
    rows = []
    for start in range(0, count, 64):
        code = code_of(data, _features(data.train, chosen[start:start + 64], device))
        rows.append(code.permute(0, 2, 3, 1).reshape(-1, code.shape[1]).float().cpu())
    return torch.cat(rows)
