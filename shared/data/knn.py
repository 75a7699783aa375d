"""STEGO's nearest-neighbour files: for each image of a split, the 30 most similar images (self first).

Similarity: cosine between L2-normalised, spatially averaged backbone features of the dataset's view
(resolution 224 centre crop by default). Stored as `nns_<backbone>_<dataset>_<split>_<crop>_<res>.npz`, key `nns`.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from shared import dist as sdist
from shared.atomic_io import atomic_open
from shared.data.feature_cache import eval_mode


def knn_path(backbone, dataset, nns_dir: str | os.PathLike = "cache/nns") -> Path:
    name = f"nns_{backbone.name}_{dataset.name}_{dataset.split}_{dataset.crop_type}_{dataset.resolution}.npz"
    return Path(nns_dir) / name.replace("/", "_")


@torch.no_grad()
def pooled_features(backbone, dataset, *, batch_size: int = 16, progress: bool = True) -> torch.Tensor:
    """(N, C) float32: spatial mean of backbone features, L2-normalised; backbone in eval mode."""
    pooled = []
    # Its own generator, so the global random stream (a trainer's initial weights) is untouched.
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator())
    with eval_mode(backbone) as device:  # the original left dropout on here by mistake
        for batch in tqdm(loader, desc=f"knn features {dataset.name}/{dataset.split}", unit="batch",
                          disable=not progress):
            feats = backbone(batch["image"].to(device))  # (B, C, h, w)
            pooled.append(feats.float().mean(dim=(2, 3)).cpu())
    return F.normalize(torch.cat(pooled), dim=1)


def topk_cosine(features: torch.Tensor, k: int, *, chunk_size: int = 256) -> np.ndarray:
    """(N, k) int64 indices of the k most similar rows of L2-normalised `features` (N, C), row i first in row i.

    Memory stays at chunk_size x N similarities. Self is forced to position 0 (similarity +inf) so that
    duplicate images cannot displace it.
    """
    n = features.shape[0]
    if k > n:
        raise ValueError(f"k={k} neighbours asked for but the split has only {n} images; pass a smaller k.")
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        sims = features[start:stop] @ features.T  # (chunk, N)
        rows = torch.arange(stop - start)
        sims[rows, rows + start] = float("inf")
        out[start:stop] = sims.topk(k, dim=1).indices.numpy()
    return out


def _nns_sha1(nns: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(nns, dtype=np.int64).tobytes()).hexdigest()


def _read_nns(path: Path, provenance: dict[str, str], n: int, k: int) -> tuple[np.ndarray | None, str | None]:
    """(nns[:, :k] int64, None) if `path` holds neighbours made from what `provenance` names, for n images and at
    least k columns, with its recorded digest, in range, self first; else (None, what is wrong; None if absent)."""
    if not path.exists():
        return None, None
    try:
        with np.load(path, allow_pickle=False) as data:
            recorded = {name: str(data[name]) for name in provenance}
            nns, digest = data["nns"], str(data["nns_sha1"])
    except (OSError, KeyError, ValueError):
        return None, "is unreadable or has no provenance (made elsewhere or by an older version)"
    if recorded != provenance:
        changed = ", ".join(name for name in provenance if recorded[name] != provenance[name])
        return None, f"was made from other data ({changed} differ)"
    if nns.ndim != 2 or nns.shape[0] != n or nns.shape[1] < k or not np.issubdtype(nns.dtype, np.integer):
        return None, f"holds neighbours of shape {nns.shape}, but {n} images x {k} are needed"
    if digest != _nns_sha1(nns) or nns.min() < 0 or nns.max() >= n or (nns[:, 0] != np.arange(n)).any():
        return None, "does not match its recorded digest (edited or damaged on disk)"
    return nns[:, :k].astype(np.int64), None


def _load_or_make(path: Path, provenance: dict[str, str], n: int, k: int, compute) -> np.ndarray:
    """The stored neighbours when they pass `_read_nns`, else computed by rank 0 (`compute()`), saved, and read by
    every other rank; a file that fails its check is replaced with a warning naming it."""
    nns, problem = _read_nns(path, provenance, n, k)
    if nns is None and sdist.get_rank() == 0:
        if problem:
            warnings.warn(f"kNN file {path} {problem}; recomputing it.", stacklevel=3)
        nns = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "wb") as f:
            np.savez(f, nns=nns, nns_sha1=np.array(_nns_sha1(nns)),
                     **{name: np.array(value) for name, value in provenance.items()})
    sdist.barrier()
    if nns is None:  # a rank other than 0: read what rank 0 wrote
        nns, problem = _read_nns(path, provenance, n, k)
        if nns is None:
            raise RuntimeError(f"kNN file {path} is missing or does not match after rank 0 computed it ({problem}); "
                               "every rank must see the same nns_dir (a shared filesystem).")
    return nns


def load_or_compute_knn(backbone, dataset, *, k: int = 30, nns_dir: str | os.PathLike = "cache/nns",
                        batch_size: int = 16, chunk_size: int = 256, progress: bool = True) -> np.ndarray:
    """(N, k) int64 neighbour indices, self first; loaded from `nns_dir` or computed (rank 0) and saved."""
    path = knn_path(backbone, dataset, nns_dir)
    provenance = {"weights_id": str(backbone.weights_id), "layer": str(int(backbone.layer)),
                  "cache_id": dataset.cache_id}

    def compute() -> np.ndarray:
        return topk_cosine(pooled_features(backbone, dataset, batch_size=batch_size, progress=progress), k,
                           chunk_size=chunk_size)

    return _load_or_make(path, provenance, len(dataset), k, compute)


def knn_from_cache_path(cached, nns_dir: str | os.PathLike) -> Path:
    """kNN file of a feature cache: named after (and so keyed like) the cache."""
    return Path(nns_dir) / f"nns_{cached.key}.npz"


def pooled_cached_features(cached, *, batch_size: int = 64) -> torch.Tensor:
    """(N, C) float32: spatial mean of the cached float16 features, L2-normalised (no backbone pass)."""
    n = len(cached.features)
    pooled = [torch.from_numpy(np.asarray(cached.features[s:s + batch_size], dtype=np.float32)).mean(dim=(2, 3))
              for s in range(0, n, batch_size)]
    return F.normalize(torch.cat(pooled), dim=1)


def knn_from_cache(cached, *, k: int = 30, nns_dir: str | os.PathLike = "cache/nns",
                   chunk_size: int = 256) -> np.ndarray:
    """(N, k) int64 neighbour indices (self first) of the images of a feature cache, computed from the cached
    features themselves (rank 0) and stored beside them under the cache's key; reused while that key and the
    cache's digest match."""
    path = knn_from_cache_path(cached, nns_dir)
    # The cache's digest, not only its key: a cache rebuilt under the same key (it failed its check) has new bytes.
    provenance = {"cache_key": str(cached.key), "cache_sha1": str(cached.meta.get("features_sha1"))}

    def compute() -> np.ndarray:
        return topk_cosine(pooled_cached_features(cached), k, chunk_size=chunk_size)

    return _load_or_make(path, provenance, len(cached), k, compute)
