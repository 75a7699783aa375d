"""Per-image PriMaPs pseudo-masks: proposals -> median filter -> background -> log-softmax -> dense CRF -> argmax.

Computed once per training image, in a process pool, and cached beside the feature cache:
`<pseudo_dir>/<key>/{masks.u8, meta.json}`, masks (N, R, R) uint8 with 0 = background and 1..M the masks in
extraction order. The key hashes everything that determines them (`key_fields`); the folder is written under a
temporary name and renamed when complete; on open the shape, the fields and the sha256 of the array are checked,
and an invalid folder is rebuilt with a warning, never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from primaps.masks import mask_log_probs, principal_mask_proposals
from shared import crf as shared_crf
from shared.worker_pool import WorkerPool, available_cores

VERSION = 2  # 2: ARPACK eigensolver. Bump when the pseudo-mask computation changes: old caches are then never reused
MASKS_FILE, META_FILE = "masks.u8", "meta.json"
MAX_MASKS = 255  # uint8 ids 1..255


@dataclass(frozen=True)
class MaskParams:
    threshold: float = 0.4
    coverage: float = 0.95
    patience: int = 3
    gain: float = 10.0


def pseudo_mask(image: torch.Tensor, features: torch.Tensor, params: MaskParams) -> np.ndarray:
    """One image's pseudo-mask: image (3, R, R) ImageNet-normalised, features (C, h, w) -> (R, R) uint8."""
    raw = principal_mask_proposals(features, threshold=params.threshold, coverage=params.coverage,
                                   patience=params.patience, max_masks=MAX_MASKS)
    log_probs = mask_log_probs(raw, params.gain)  # (M + 1, h, w)
    size = tuple(image.shape[-2:])
    if log_probs.shape[0] == 1:
        return np.zeros(size, dtype=np.uint8)
    return shared_crf.dense_crf(image, log_probs).argmax(axis=0).astype(np.uint8)


def key_fields(feature_key: str, dataset, params: MaskParams, base_sha256: str | None) -> dict:
    """Everything that determines the pseudo-masks of a split."""
    return {"version": VERSION, "feature_cache": feature_key, "dataset": dataset.cache_id,
            "resolution": int(dataset.resolution), "base_sha256": base_sha256, "params": asdict(params),
            "max_masks": MAX_MASKS,
            "crf": [shared_crf.GAUSSIAN_SXY, shared_crf.GAUSSIAN_COMPAT, shared_crf.BILATERAL_SXY,
                    shared_crf.BILATERAL_SRGB, shared_crf.BILATERAL_COMPAT, shared_crf.N_ITERATIONS]}


def cache_path(pseudo_dir: str | os.PathLike, fields: dict) -> Path:
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return Path(pseudo_dir) / f"{fields['dataset']}-{digest}"


def file_sha256(path: str | os.PathLike) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            hasher.update(block)
    return hasher.hexdigest()


def open_masks(path: Path, fields: dict) -> np.ndarray | None:
    """The cached masks (N, R, R) uint8 memmap, or None when missing, incomplete, stale or corrupt."""
    try:
        meta = json.loads((path / META_FILE).read_text())
        shape = tuple(meta["shape"])
        if meta["fields"] != fields or (path / MASKS_FILE).stat().st_size != int(np.prod(shape)):
            return None
        if file_sha256(path / MASKS_FILE) != meta["sha256"]:
            return None
        return np.memmap(path / MASKS_FILE, dtype=np.uint8, mode="r", shape=shape)
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------------- the pool

_WORKER_DATASET = None


def _init_worker(dataset) -> None:
    global _WORKER_DATASET
    _WORKER_DATASET = dataset
    torch.set_num_threads(1)  # one image per core: threads inside a worker would only fight each other
    threadpool_limits(1)  # scipy's BLAS (the eigensolver) too


def _worker_job(index: int, features: np.ndarray, params: MaskParams) -> np.ndarray:
    return pseudo_mask(_WORKER_DATASET[index]["image"], torch.from_numpy(features), params)


def compute_masks(dataset, features_of: Callable[[int], np.ndarray], params: MaskParams, *, workers: int = 0,
                  timeout_s: float = 300.0, progress: bool = True) -> np.ndarray:
    """Pseudo-masks (N, R, R) uint8 of every image of `dataset`; `features_of(i)` gives image i's (C, h, w).

    workers: processes (0 = the available cores); 1 runs here, without a pool. A worker that dies, or an image not
    done `timeout_s` after it was handed out, stops everything with an error naming the image: never a hang.
    """
    n, res = len(dataset), int(dataset.resolution)
    out = np.zeros((n, res, res), dtype=np.uint8)
    workers = workers or available_cores()
    bar = tqdm(total=n, unit="img", desc=f"PriMaPs pseudo-masks {dataset.name}/{dataset.split}", disable=not progress)
    with bar:
        if workers == 1:
            # one BLAS thread, as in the pool's workers: the eigensolver's matrix-vector products are too small
            # for threads (their wake-up costs more than the product)
            with threadpool_limits(limits=1, user_api="blas"):
                for i in range(n):
                    out[i] = pseudo_mask(dataset[i]["image"], torch.from_numpy(features_of(i)), params)
                    bar.update(1)
            return out
        _run_pool(dataset, features_of, params, out, workers, timeout_s, bar)
    return out


def _run_pool(dataset, features_of, params, out: np.ndarray, workers: int, timeout_s: float, bar) -> None:
    def keep(index: int, mask: np.ndarray) -> None:
        out[index] = mask
        bar.update(1)

    # By name, so that every worker looks the job up in this module (tests replace it); the dataset reaches the
    # workers once, through the initializer, not with every job.
    with WorkerPool((__name__, "_worker_job"), workers, name="primaps-worker",
                    initializer=(__name__, "_init_worker"), initargs=(dataset,)) as pool:
        outcome = pool.run(len(dataset), lambda index: (index, features_of(index), params), keep,
                           timeout_s=timeout_s, fail_fast=True)
    if outcome.died:
        index = outcome.died[0]
        raise RuntimeError(f"a PriMaPs pseudo-mask worker died on image {index} ({dataset.image_path(index)}) "
                           "(killed, out of memory?); rerun with pseudo_workers=1 to see the error in this process.")
    if outcome.late:
        raise TimeoutError(f"PriMaPs pseudo-masks of image(s) {sorted(outcome.late)} took over {timeout_s} s; raise "
                           "pseudo_timeout_s or check that image (a stuck CRF?).")


# ---------------------------------------------------------------------------------------------------- the cache


def load_or_compute(pseudo_dir: str | os.PathLike, fields: dict, dataset, features_of: Callable[[int], np.ndarray],
                    params: MaskParams, *, workers: int = 0, timeout_s: float = 300.0, progress: bool = True,
                    log: Callable[[str], None] = print) -> np.ndarray:
    """The split's pseudo-masks from the cache, computing (and caching) them first when absent or invalid."""
    path = cache_path(pseudo_dir, fields)
    masks = open_masks(path, fields)
    if masks is not None:
        return masks
    if path.exists():
        warnings.warn(f"PriMaPs pseudo-mask cache {path} is incomplete, stale or corrupt; rebuilding it.", stacklevel=2)
        shutil.rmtree(path, ignore_errors=True)
    began = time.perf_counter()
    array = compute_masks(dataset, features_of, params, workers=workers, timeout_s=timeout_s, progress=progress)
    seconds = time.perf_counter() - began
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        array.tofile(tmp / MASKS_FILE)
        meta = {"fields": fields, "shape": list(array.shape), "sha256": file_sha256(tmp / MASKS_FILE),
                "seconds": round(seconds, 2), "masks_per_image": float(array.reshape(len(array), -1).max(1).mean())}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))  # written last: marks the folder complete
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"PriMaPs pseudo-masks: {len(array)} images in {seconds:.1f} s, {meta['masks_per_image']:.1f} masks per "
        f"image on average, cached at {path}")
    masks = open_masks(path, fields)
    if masks is None:
        raise RuntimeError(f"PriMaPs pseudo-mask cache {path} failed validation right after writing it; check the "
                           "disk and delete the folder.")
    return masks
