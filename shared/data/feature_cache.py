"""Frozen-backbone features of every image of a dataset, computed once and memory-mapped (float16).

Layout: `<cache_dir>/<key>/features.f16` (N, C, h, w), `labels.i16` (N, R, R) when the dataset has labels,
`meta.json`. A build writes into `<key>.tmp-<pid>/` and renames it to `<key>/` only when complete, so an
interrupted build never looks whole; leftovers of dead builders are removed by the next build.

With flip=True the features are those of the horizontally flipped images, *not* flipped back; labels are
always those of the unflipped images (flip the code back before averaging, as STEGO does).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from shared import dist as sdist
from shared.features import canonical_descriptor, descriptor_id

CACHE_FORMAT = 2  # 2: keyed by the feature descriptor instead of a block index
FEATURES_FILE, LABELS_FILE, META_FILE = "features.f16", "labels.i16", "meta.json"


@dataclass
class CachedFeatures:
    """features: np.memmap float16 (N, C, h, w); labels: int16 (N, R, R) with -1 ignore, or None."""

    features: np.ndarray
    labels: np.ndarray | None
    key: str
    meta: dict
    path: Path

    def __len__(self) -> int:
        return int(self.features.shape[0])


def key_fields(backbone, dataset, *, flip: bool) -> dict:
    """Everything that determines the cached arrays."""
    return {
        "format": CACHE_FORMAT,
        "backbone": str(backbone.name),
        "weights_id": str(backbone.weights_id),
        "features": canonical_descriptor(backbone.descriptor),
        "use_bf16": bool(getattr(backbone, "use_bf16", False)),
        "dataset": dataset.cache_id,
        "flip": bool(flip),
        "dtype": "float16",
    }


def cache_key(backbone, dataset, *, flip: bool = False) -> str:
    """Readable prefix plus a hash of `key_fields`: `dinov2_vits14-tokens-L-1-camvid_sample-train-noflip-<hash>`."""
    fields = key_fields(backbone, dataset, flip=flip)
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    parts = [backbone.name, descriptor_id(backbone.descriptor), dataset.name, dataset.split,
             "flip" if flip else "noflip"]
    prefix = "-".join(parts).replace("/", "_")
    return f"{prefix}-{digest}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_builds(cache_dir: Path, key: str) -> None:
    """Delete `<key>.tmp-<pid>` folders whose builder is gone (a crash or kill left them behind)."""
    for tmp in cache_dir.glob(f"{key}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def eval_mode(backbone) -> Iterator[torch.device]:
    """Run the block with `backbone` in eval mode (no dropout), restoring its mode after; yields its device."""
    try:
        device = next(backbone.parameters()).device
    except (AttributeError, StopIteration):
        device = torch.device(getattr(backbone, "device", "cpu"))
    was_training = getattr(backbone, "training", False)
    if hasattr(backbone, "eval"):
        backbone.eval()
    try:
        yield device
    finally:
        if was_training and hasattr(backbone, "train"):
            backbone.train()


def _open(path: Path) -> CachedFeatures | None:
    """Open a finished cache folder, or None when it is incomplete or inconsistent."""
    try:
        meta = json.loads((path / META_FILE).read_text())
        shape = tuple(meta["features_shape"])
        if (path / FEATURES_FILE).stat().st_size != int(np.prod(shape)) * 2:
            return None
        features = np.memmap(path / FEATURES_FILE, dtype=np.float16, mode="r", shape=shape)
        labels = None
        if meta.get("labels_shape"):
            lshape = tuple(meta["labels_shape"])
            if (path / LABELS_FILE).stat().st_size != int(np.prod(lshape)) * 2:
                return None
            labels = np.memmap(path / LABELS_FILE, dtype=np.int16, mode="r", shape=lshape)
    except (OSError, ValueError, KeyError):
        return None
    return CachedFeatures(features=features, labels=labels, key=meta["key"], meta=meta, path=path)


class FeatureCache:
    """`FeatureCache(cache_dir).get(backbone, dataset, flip=False)` -> CachedFeatures, built on first use."""

    def __init__(self, cache_dir: str | os.PathLike = "cache/features") -> None:
        self.cache_dir = Path(cache_dir)

    def path_for(self, backbone, dataset, *, flip: bool = False) -> Path:
        return self.cache_dir / cache_key(backbone, dataset, flip=flip)

    def get(self, backbone, dataset, *, flip: bool = False, batch_size: int = 16, num_workers: int = 0,
            progress: bool = True) -> CachedFeatures:
        """Open the cached features, building them first if needed (rank 0 only under DDP; others wait)."""
        path = self.path_for(backbone, dataset, flip=flip)
        if sdist.get_rank() == 0 and _open(path) is None:
            self._build(backbone, dataset, path, flip=flip, batch_size=batch_size, num_workers=num_workers,
                        progress=progress)
        sdist.barrier()
        cached = _open(path)
        if cached is None:
            raise RuntimeError(f"Feature cache {path} is missing or incomplete after rank 0 built it; every rank "
                               "must see the same cache_dir (a shared filesystem). Delete the folder and retry.")
        return cached

    def _build(self, backbone, dataset, path: Path, *, flip: bool, batch_size: int, num_workers: int,
               progress: bool) -> None:
        if len(dataset) == 0:
            raise ValueError(f"Dataset {dataset!r} is empty; there is nothing to cache.")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(self.cache_dir, path.name)
        if path.exists():  # a finished-looking folder that failed to open: rebuild it rather than trust it
            warnings.warn(f"Feature cache {path} is incomplete or inconsistent; rebuilding it.", stacklevel=3)
            shutil.rmtree(path)
        tmp = self.cache_dir / f"{path.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            meta = self._write_arrays(backbone, dataset, tmp, flip=flip, batch_size=batch_size,
                                      num_workers=num_workers, progress=progress)
            meta.update(key=path.name, fields=key_fields(backbone, dataset, flip=flip))
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1))  # written last: marks the arrays complete
            self._publish(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @staticmethod
    def _publish(tmp: Path, path: Path) -> None:
        try:
            os.rename(tmp, path)
        except OSError:
            if _open(path) is None:  # not another builder's finished copy: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _write_arrays(backbone, dataset, tmp: Path, *, flip: bool, batch_size: int, num_workers: int,
                      progress: bool) -> dict:
        """Run the backbone over the dataset in order and fill the memmaps; returns the meta fields."""
        n, res = len(dataset), dataset.resolution
        # Its own generator: a DataLoader draws a seed per iterator, which would otherwise shift the global random
        # stream on the rank that builds (and a trainer's initial weights with it).
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            generator=torch.Generator())
        labels = None
        if dataset.has_labels:
            labels = np.memmap(tmp / LABELS_FILE, dtype=np.int16, mode="w+", shape=(n, res, res))
        features, start, t0 = None, 0, time.perf_counter()
        bar = tqdm(total=n, unit="img", desc=f"features {dataset.name}/{dataset.split}", disable=not progress)
        with eval_mode(backbone) as device, bar:
            for batch in loader:
                images = batch["image"].to(device)  # (B, 3, R, R)
                if flip:
                    images = images.flip(-1)
                with torch.no_grad():
                    out = backbone(images)  # (B, C, h, w)
                if features is None:
                    features = np.memmap(tmp / FEATURES_FILE, dtype=np.float16, mode="w+",
                                         shape=(n, *out.shape[1:]))
                stop = start + out.shape[0]
                features[start:stop] = out.detach().float().cpu().numpy().astype(np.float16)
                if labels is not None:
                    labels[start:stop] = batch["label"].numpy().astype(np.int16)
                start = stop
                bar.update(out.shape[0])
        seconds = time.perf_counter() - t0
        features.flush()
        if labels is not None:
            labels.flush()
        return {
            "features_shape": list(features.shape), "labels_shape": list(labels.shape) if labels is not None else None,
            "n_images": n, "resolution": res, "flip": bool(flip), "dataset": dataset.name, "split": dataset.split,
            "n_classes": dataset.n_classes, "class_names": list(dataset.class_names),
            "backbone": backbone.name, "weights_id": backbone.weights_id, "features": backbone.descriptor,
            "patch_size": getattr(backbone, "patch_size", None), "build_seconds": round(seconds, 3),
            "images_per_s": round(n / max(seconds, 1e-9), 2), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }  # fmt: skip
