"""STEGO's nearest-neighbour files: for each image of a split, the 30 most similar images (self first).

Similarity: cosine between L2-normalised, spatially averaged backbone features of the dataset's view
(resolution 224 centre crop by default). Stored as `nns_<backbone>_<dataset>_<split>_<crop>_<res>.npz`, key `nns`.
"""

from __future__ import annotations

import os
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


def _stored_matches(path: Path, backbone, dataset, k: int) -> np.ndarray | None:
    """The stored nns if they were made with this backbone/weights/layer/files and at least k columns."""
    try:
        with np.load(path, allow_pickle=False) as data:
            same = (
                str(data["weights_id"]) == str(backbone.weights_id) and int(data["layer"]) == int(backbone.layer)
                and str(data["cache_id"]) == dataset.cache_id
            )  # fmt: skip
            nns = data["nns"]
    except (OSError, KeyError, ValueError):
        return None  # a file from elsewhere (e.g. STEGO's own) without our provenance: recompute
    if not same or nns.shape[0] != len(dataset) or nns.shape[1] < k:
        return None
    return nns[:, :k].astype(np.int64)


def _save(path: Path, nns: np.ndarray, backbone, dataset) -> None:
    with atomic_open(path, "wb") as f:
        np.savez(f, nns=nns, weights_id=np.array(str(backbone.weights_id)), layer=np.array(int(backbone.layer)),
                 cache_id=np.array(dataset.cache_id))


def load_or_compute_knn(backbone, dataset, *, k: int = 30, nns_dir: str | os.PathLike = "cache/nns",
                        batch_size: int = 16, chunk_size: int = 256, progress: bool = True) -> np.ndarray:
    """(N, k) int64 neighbour indices, self first; loaded from `nns_dir` or computed (rank 0) and saved."""
    path = knn_path(backbone, dataset, nns_dir)
    nns = _stored_matches(path, backbone, dataset, k) if path.exists() else None
    if nns is None and sdist.get_rank() == 0:
        feats = pooled_features(backbone, dataset, batch_size=batch_size, progress=progress)
        nns = topk_cosine(feats, k, chunk_size=chunk_size)
        _save(path, nns, backbone, dataset)
    sdist.barrier()
    if nns is None:  # a rank other than 0: read what rank 0 wrote
        nns = _stored_matches(path, backbone, dataset, k)
        if nns is None:
            raise RuntimeError(f"kNN file {path} is missing or does not match after rank 0 computed it; every rank "
                               "must see the same nns_dir (a shared filesystem).")
    return nns


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
    features themselves (rank 0) and stored beside them under the cache's key; reused while that key matches."""
    path = knn_from_cache_path(cached, nns_dir)

    def stored() -> np.ndarray | None:
        try:
            with np.load(path, allow_pickle=False) as data:
                key, nns = str(data["cache_key"]), data["nns"]
        except (OSError, KeyError, ValueError):
            return None
        if key != cached.key or nns.ndim != 2 or nns.shape[0] != len(cached) or nns.shape[1] < k:
            return None
        return nns[:, :k].astype(np.int64)

    nns = stored()
    if nns is None and sdist.get_rank() == 0:
        nns = topk_cosine(pooled_cached_features(cached), k, chunk_size=chunk_size)
        with atomic_open(path, "wb") as f:
            np.savez(f, nns=nns, cache_key=np.array(cached.key))
    sdist.barrier()
    if nns is None:
        nns = stored()
        if nns is None:
            raise RuntimeError(f"kNN file {path} is missing or does not match after rank 0 computed it; every rank "
                               "must see the same nns_dir (a shared filesystem).")
    return nns
