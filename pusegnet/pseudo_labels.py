"""Pseudo-labels of the training split from a frozen base segmenter, computed once and cached.

For every cached training image the base's cluster probabilities ``softmax(cluster_logits)`` at the feature
grid give the pseudo-label ``argmax`` (int16) and its confidence ``max`` (float16). The file
``<dir>/<feature cache key>-<base sha256[:16]>.npz`` is keyed by everything that determines it: the feature
cache key (backbone, weights, descriptor, dataset view) and the base file's sha256. It is written to a
temporary name and renamed; on open its shapes, dtypes and the recorded digests of both arrays are checked, and
an invalid file is rebuilt with a warning.
"""

from __future__ import annotations

import hashlib
import json
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from shared import dist as sdist
from shared.atomic_io import atomic_path

FORMAT = 1


@dataclass
class PseudoLabels:
    """labels (N, h, w) int16 cluster ids; confidence (N, h, w) float16 in [0, 1]; path of the cache file."""

    labels: np.ndarray
    confidence: np.ndarray
    path: Path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _array_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def cache_path(directory: Path, feature_key: str, base_sha256: str) -> Path:
    return Path(directory) / f"{feature_key}-{base_sha256[:16]}.npz"


@torch.no_grad()
def compute_pseudo_labels(base, features: np.ndarray, *, batch_size: int, source: str,
                          device: torch.device | str = "cpu", progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Run ``base`` (features -> dict with cluster_logits) over cached features (N, C, h, w).

    Returns labels (N, h, w) int16 and confidence (N, h, w) float16. A ValueError names ``source`` and the
    image when the features hold NaN or infinite values.
    """
    n, _, h, w = features.shape
    labels = np.empty((n, h, w), dtype=np.int16)
    confidence = np.empty((n, h, w), dtype=np.float16)
    for start in tqdm(range(0, n, batch_size), desc="pseudo-labels", unit="batch", disable=not progress):
        x = torch.from_numpy(np.asarray(features[start:start + batch_size], dtype=np.float32)).to(device)
        bad = (~torch.isfinite(x)).flatten(1).any(dim=1)
        if bool(bad.any()):
            index = start + int(bad.nonzero()[0, 0])
            raise ValueError(f"feature cache {source} holds NaN or infinite features at image {index}; delete that "
                             "cache folder so that it is rebuilt (and check the backbone weights).")
        probs = torch.softmax(base(x)["cluster_logits"].float(), dim=1)
        conf, pred = probs.max(dim=1)
        labels[start:start + len(x)] = pred.cpu().numpy().astype(np.int16)
        confidence[start:start + len(x)] = conf.cpu().numpy().astype(np.float16)
    return labels, confidence


def _write(path: Path, labels: np.ndarray, confidence: np.ndarray, meta: dict) -> None:
    meta = {**meta, "format": FORMAT, "labels_sha256": _array_digest(labels),
            "confidence_sha256": _array_digest(confidence)}
    with atomic_path(path, suffix=".tmp.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, labels=labels, confidence=confidence, meta=np.array(json.dumps(meta, sort_keys=True)))


def _open(path: Path, shape: tuple[int, int, int], meta: dict) -> PseudoLabels | None:
    """The cached pseudo-labels, or None when the file is missing, damaged or does not match."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            labels, confidence = data["labels"], data["confidence"]
            stored = json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    ok = (labels.shape == shape and confidence.shape == shape and labels.dtype == np.int16
          and confidence.dtype == np.float16 and stored.get("format") == FORMAT
          and all(stored.get(k) == v for k, v in meta.items())
          and stored.get("labels_sha256") == _array_digest(labels)
          and stored.get("confidence_sha256") == _array_digest(confidence))
    return PseudoLabels(labels, confidence, path) if ok else None


def load_or_compute(base, base_path: Path, cached_features, directory: Path, *, batch_size: int = 32,
                    device: torch.device | str = "cpu") -> PseudoLabels:
    """The pseudo-labels of ``cached_features`` (a CachedFeatures) under ``base``: read from the cache, or
    computed by rank 0 and written there first (the other ranks wait and read)."""
    n, _, h, w = cached_features.features.shape
    base_sha = file_sha256(Path(base_path))
    path = cache_path(directory, cached_features.key, base_sha)
    meta = {"feature_key": cached_features.key, "base_sha256": base_sha, "n_clusters": int(base.metadata["n_clusters"])}
    if sdist.get_rank() == 0 and _open(path, (n, h, w), meta) is None:
        if path.exists():
            warnings.warn(f"pseudo-label cache {path} is damaged or does not match its key; rebuilding it.",
                          stacklevel=2)
        labels, confidence = compute_pseudo_labels(base, cached_features.features, batch_size=batch_size,
                                                   source=str(cached_features.path), device=device)
        _write(path, labels, confidence, meta)
    sdist.barrier()
    opened = _open(path, (n, h, w), meta)
    if opened is None:
        raise RuntimeError(f"pseudo-label cache {path} is missing or invalid after rank 0 wrote it; every rank must "
                           "see the same cache_dir (a shared filesystem). Delete the file and retry.")
    return opened
