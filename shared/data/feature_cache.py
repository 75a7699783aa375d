"""Frozen-backbone features of every image of a dataset, computed once and memory-mapped (float16).

Layout: `<cache_dir>/<key>/features.f16` (N, C, h, w), `labels.i16` (N, R, R) when the dataset has labels,
`meta.json`. A build writes into `<key>.tmp-<id>/` and renames it to `<key>/` only when complete, so an
interrupted build never looks whole; leftovers of dead builders are removed by the next build.

One process builds alone; under torchrun every rank builds its shard and rank 0 publishes the whole
(`shared.data.cache_shards`), byte for byte what one process would have written. Before a build the cache
prints its size and refuses to start when the filesystem has too little room (`shared.data.cache_disk`).

With flip=True the features are those of the horizontally flipped images, *not* flipped back; labels are
always those of the unflipped images (flip the code back before averaging, as STEGO does).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from tqdm import tqdm

from shared import dist as sdist
from shared.atomic_io import atomic_write_text
from shared.data import cache_shards
from shared.data.cache_disk import CacheSpaceError, cache_bytes, check_free_space
from shared.data.cache_files import (
    FEATURES_FILE,
    LABELS_FILE,
    META_FILE,
    BuildJob,
    CachedFeatures,
    eval_mode,
    final_meta,
    no_space_as_error,
    open_cache,
    owned,
    plan_build,
    prepare_folder,
    publish,
    read_cache,
    write_rows,
)
from shared.features import canonical_descriptor, descriptor_id

CACHE_FORMAT = 3  # 2: keyed by the feature descriptor instead of a block index; 3: sampled digests in meta.json

__all__ = [
    "CACHE_FORMAT", "FEATURES_FILE", "LABELS_FILE", "META_FILE", "CacheSpaceError", "CachedFeatures", "FeatureCache",
    "cache_bytes", "cache_key", "eval_mode", "key_fields",
]  # fmt: skip


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
    """Readable prefix plus a hash of `key_fields`.

    E.g. `dinov2_vits14-tokens-L-1-camvid_sample-train-noflip-<16 hex>`.
    """
    fields = key_fields(backbone, dataset, flip=flip)
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    parts = [backbone.name, descriptor_id(backbone.descriptor), dataset.name, dataset.split,
             "flip" if flip else "noflip"]
    prefix = "-".join(parts).replace("/", "_")
    return f"{prefix}-{digest}"


def _static_meta(backbone, dataset, path: Path, flip: bool) -> dict:
    """The meta.json fields known before the build."""
    return {
        "key": path.name, "fields": key_fields(backbone, dataset, flip=flip), "n_images": len(dataset),
        "resolution": dataset.resolution, "flip": bool(flip), "dataset": dataset.name, "split": dataset.split,
        "n_classes": dataset.n_classes, "class_names": list(dataset.class_names), "backbone": backbone.name,
        "weights_id": backbone.weights_id, "features": backbone.descriptor,
        "patch_size": getattr(backbone, "patch_size", None),
    }  # fmt: skip


class FeatureCache:
    """`FeatureCache(cache_dir).get(backbone, dataset, flip=False)` -> CachedFeatures, built on first use."""

    def __init__(self, cache_dir: str | os.PathLike = "cache/features") -> None:
        self.cache_dir = Path(cache_dir)

    def path_for(self, backbone, dataset, *, flip: bool = False) -> Path:
        return self.cache_dir / cache_key(backbone, dataset, flip=flip)

    def get(self, backbone, dataset, *, flip: bool = False, batch_size: int = 16, num_workers: int = 0,
            progress: bool = True, verify: bool = False) -> CachedFeatures:
        """Open the cached features, building them first if needed.

        Under torchrun every rank computes its shard and rank 0 publishes (see `shared.data.cache_shards`);
        every rank must call this with the same arguments. `batch_size` is part of what makes the bytes
        reproducible: a rebuild with the same batch size gives the same bytes, sharded or not. A cache that
        fails its check when opened (sizes and sampled blocks always, every byte with `verify`; see
        `shared.data.cache_check`) is rebuilt with a warning naming it.
        """
        path = self.path_for(backbone, dataset, flip=flip)
        job = BuildJob(backbone, dataset, path, flip=flip, batch_size=batch_size, num_workers=num_workers,
                       progress=progress, meta=_static_meta(backbone, dataset, path, flip))
        if sdist.get_world_size() > 1:
            return cache_shards.get_sharded(job, verify=verify)
        found, problem = read_cache(path, verify=verify)
        if found is not None:
            return found
        self._build(job, problem)
        cached = open_cache(path)
        if cached is None:
            raise RuntimeError(f"Feature cache {path} is missing or incomplete right after it was built; another "
                               "process may be deleting it. Delete the folder and retry.")
        return cached

    @staticmethod
    def _build(job: BuildJob, problem: str | None = None) -> None:
        """One process: write every row into `<key>.tmp-<pid>/`, then publish it by a rename."""
        prepare_folder(job, problem)
        plan = plan_build(job)
        print(plan.describe(job.path.name) + f" in {job.cache_dir}", flush=True)
        check_free_space(job.cache_dir, plan.total_bytes, f"Feature cache {job.path.name}")
        tmp = job.cache_dir / f"{job.path.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            with owned(tmp, run_id=str(os.getpid())), no_space_as_error(tmp, plan.total_bytes):
                bar = tqdm(total=plan.n_images, unit="img", disable=not job.progress,
                           desc=f"features {job.dataset.name}/{job.dataset.split}")
                with bar:
                    written = write_rows(job, plan, tmp, range(plan.n_images), bar)
                # written last: marks the arrays complete
                atomic_write_text(tmp / META_FILE, json.dumps(final_meta(job, plan, written, tmp), indent=1))
            publish(tmp, job.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
