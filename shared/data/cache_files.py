"""The feature cache on disk: its layout, opening a finished cache, writing rows of features, owning a build.

Published layout (what readers open): `<cache_dir>/<key>/features.f16` (N, C, h, w), `labels.i16` (N, R, R)
when the dataset has labels, `meta.json`. A build writes into `<key>.tmp-<id>/`, which holds an `owner.json`
(host, pid, heartbeat) while the build runs, and renames it to `<key>/` only when complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from shared.atomic_io import atomic_write_text
from shared.data.cache_check import check_digests, sampled_digests
from shared.data.cache_disk import allocated_memmap, cache_bytes, human_bytes, no_space_error

FEATURES_FILE, LABELS_FILE, META_FILE, OWNER_FILE = "features.f16", "labels.i16", "meta.json", "owner.json"
HEARTBEAT_S = 30.0  # a live build touches its owner.json this often
STALE_AFTER_S = 600.0  # a build on another host whose owner.json is this old is dead (no pid to check there)


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


@dataclass
class BuildJob:
    """Everything one build needs: the backbone over `dataset`, into `path` (the published folder)."""

    backbone: object
    dataset: object
    path: Path
    flip: bool
    batch_size: int
    num_workers: int
    progress: bool
    meta: dict = field(default_factory=dict)  # the fields that do not depend on the build (key, dataset, ...)

    @property
    def cache_dir(self) -> Path:
        return self.path.parent


@dataclass(frozen=True)
class Plan:
    """The arrays a build will write, known before any backbone call."""

    n_images: int
    feature_shape: tuple[int, int, int]  # (C, h, w) per image
    resolution: int
    has_labels: bool

    @property
    def total_bytes(self) -> int:
        return cache_bytes(self.n_images, self.feature_shape[0], self.feature_shape[1:], self.resolution,
                           labels=self.has_labels)

    def rows_bytes(self, n_rows: int) -> int:
        return cache_bytes(n_rows, self.feature_shape[0], self.feature_shape[1:], self.resolution,
                           labels=self.has_labels)

    def describe(self, key: str) -> str:
        c, h, w = self.feature_shape
        labels = f" + labels {self.n_images} x {self.resolution}x{self.resolution} x 2 B" if self.has_labels else ""
        return (f"feature cache {key}: {self.n_images} images x {c} x {h}x{w} x 2 B{labels} = "
                f"{human_bytes(self.total_bytes)}")


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


def read_cache(path: Path, *, verify: bool = False) -> tuple[CachedFeatures | None, str | None]:
    """(the opened cache, None), or (None, what is wrong with it); (None, None) when there is no folder at all.

    Always checks each array's size and the digest of its sampled blocks; `verify` hashes every byte too
    (`shared.data.cache_check`).
    """
    if not path.exists():
        return None, None
    try:
        meta = json.loads((path / META_FILE).read_text())
        files = {FEATURES_FILE: (tuple(meta["features_shape"]), np.float16, "features_sha1")}
        if meta.get("labels_shape"):
            files[LABELS_FILE] = (tuple(meta["labels_shape"]), np.int16, "labels_sha1")
        for name, (shape, dtype, _) in files.items():
            size, expected = (path / name).stat().st_size, int(np.prod(shape)) * np.dtype(dtype).itemsize
            if size != expected:
                return None, f"is incomplete or inconsistent ({name} has {size} bytes, its shape needs {expected})"
        problem = check_digests(path, meta, {name: sha for name, (_, _, sha) in files.items()}, verify=verify)
        if problem:
            return None, f"failed its check: {problem}"
        arrays = {name: np.memmap(path / name, dtype=dtype, mode="r", shape=shape)
                  for name, (shape, dtype, _) in files.items()}
        key = str(meta["key"])
    except (OSError, ValueError, KeyError, TypeError):  # a file missing, meta.json unreadable or malformed
        return None, "is incomplete or inconsistent"
    return CachedFeatures(features=arrays[FEATURES_FILE], labels=arrays.get(LABELS_FILE), key=key, meta=meta,
                          path=path), None


def open_cache(path: Path, *, verify: bool = False) -> CachedFeatures | None:
    """Open a finished cache folder, or None when it is missing, incomplete or fails its check (see read_cache)."""
    return read_cache(path, verify=verify)[0]


def plan_build(job: BuildJob) -> Plan:
    """The cache's shape from the backbone's attributes (feature_dim, patch_size): no backbone call needed."""
    dataset, res = job.dataset, job.dataset.resolution
    channels, patch = getattr(job.backbone, "feature_dim", None), getattr(job.backbone, "patch_size", None)
    if channels and patch:
        shape = (int(channels), res // int(patch), res // int(patch))
    else:  # a backbone without those attributes: one forward tells
        with eval_mode(job.backbone) as device, torch.no_grad():
            shape = tuple(job.backbone(dataset[0]["image"][None].to(device)).shape[1:])
    return Plan(len(dataset), shape, res, bool(dataset.has_labels))


def write_rows(job: BuildJob, plan: Plan, folder: Path, rows: range, bar, on_first_batch=None) -> dict:
    """Run the backbone over images `rows` in order and fill folder/features.f16 (and labels.i16).

    Files are allocated in full before the first batch; `on_first_batch(seconds)` is called once it is written
    (a sharded build paces its waits by it). Returns the sha1 of each file's bytes (hashed as they are written,
    so checking a part costs no extra read on the writer) and the seconds spent.
    """
    n, res = len(rows), plan.resolution
    features = allocated_memmap(folder / FEATURES_FILE, np.float16, (n, *plan.feature_shape))
    labels = allocated_memmap(folder / LABELS_FILE, np.int16, (n, res, res)) if plan.has_labels else None
    # Its own generator: a DataLoader draws a seed per iterator, which would otherwise shift the global random
    # stream on the ranks that build (and a trainer's initial weights with it).
    loader = DataLoader(Subset(job.dataset, rows), batch_size=job.batch_size, shuffle=False,
                        num_workers=job.num_workers, generator=torch.Generator())
    feature_sha, label_sha, start, t0 = hashlib.sha1(), hashlib.sha1(), 0, time.perf_counter()
    with eval_mode(job.backbone) as device:
        for batch in loader:
            images = batch["image"].to(device)  # (B, 3, R, R)
            if job.flip:
                images = images.flip(-1)
            with torch.no_grad():
                out = job.backbone(images)  # (B, C, h, w)
            if tuple(out.shape[1:]) != plan.feature_shape:
                raise ValueError(f"backbone {getattr(job.backbone, 'name', '?')} returned features of shape "
                                 f"{tuple(out.shape[1:])} per image, but its feature_dim and patch_size promise "
                                 f"{plan.feature_shape}; fix those attributes (the cache is planned from them).")
            chunk = np.ascontiguousarray(out.detach().float().cpu().numpy().astype(np.float16))
            stop = start + chunk.shape[0]
            features[start:stop] = chunk
            feature_sha.update(chunk)
            if labels is not None:
                label_chunk = np.ascontiguousarray(batch["label"].numpy().astype(np.int16))
                labels[start:stop] = label_chunk
                label_sha.update(label_chunk)
            if start == 0 and on_first_batch is not None:
                on_first_batch(time.perf_counter() - t0)
            start = stop
            bar.update(chunk.shape[0])
    for array in (features, labels):
        if array is not None:
            array.flush()  # msync: on a network filesystem the bytes reach the server before the part is marked
    return {"features_sha1": feature_sha.hexdigest(), "labels_sha1": label_sha.hexdigest() if plan.has_labels
            else None, "seconds": time.perf_counter() - t0}


def final_meta(job: BuildJob, plan: Plan, written: dict, folder: Path, **extra) -> dict:
    """meta.json of a finished build in `folder`: the job's fields, the shapes, digests and timings."""
    n, res = plan.n_images, plan.resolution
    sampled = sampled_digests(folder, {FEATURES_FILE: written["features_sha1"], LABELS_FILE: written["labels_sha1"]})
    seconds = written["seconds"]
    return {
        **job.meta, "features_shape": [n, *plan.feature_shape],
        "labels_shape": [n, res, res] if plan.has_labels else None,
        "features_sha1": written["features_sha1"], "labels_sha1": written["labels_sha1"],
        "build_seconds": round(seconds, 3), "images_per_s": round(n / max(seconds, 1e-9), 2),
        **sampled, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra,
    }  # fmt: skip


def publish(tmp: Path, path: Path) -> None:
    """Rename the finished `tmp` to `path`; if another builder got there first with a good cache, keep theirs."""
    try:
        os.rename(tmp, path)
    except OSError:
        if open_cache(path) is None:  # not another builder's finished copy: a real failure
            raise
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def no_space_as_error(folder: Path, needed: int) -> Iterator[None]:
    """Turn an ENOSPC met in the block (a small file, after the big ones were allocated) into CacheSpaceError."""
    try:
        yield
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise no_space_error(folder, needed, err) from None
        raise


def prepare_folder(job: BuildJob, problem: str | None = None) -> None:
    """Make the cache folder, drop leftovers of dead builders and a published folder that does not open
    (`problem`: what read_cache found wrong with it, for the warning)."""
    if len(job.dataset) == 0:
        raise ValueError(f"Dataset {job.dataset!r} is empty; there is nothing to cache.")
    job.cache_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(job.cache_dir, job.path.name)
    if job.path.exists():  # a finished-looking folder that failed to open: rebuild it rather than trust it
        problem = problem or read_cache(job.path)[1] or "is incomplete or inconsistent"
        warnings.warn(f"Feature cache {job.path} {problem}; rebuilding it.", stacklevel=4)
        shutil.rmtree(job.path)


# --- owning a build: who is writing a temporary folder, and whether it is still alive ---------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def owned(tmp: Path, run_id: str) -> Iterator[None]:
    """Mark `tmp` as being built by this process (owner.json, touched every HEARTBEAT_S) for the block.

    The heartbeat runs in a thread so that it continues while this process waits at a barrier. owner.json is
    removed on a normal exit, so the published folder holds only what readers open.
    """
    owner = tmp / OWNER_FILE
    atomic_write_text(owner, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id}))
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                os.utime(owner)
            except OSError:
                return  # the folder is gone (removed after a failure): nothing left to keep alive

    thread = threading.Thread(target=beat, name=f"heartbeat {tmp.name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    owner.unlink(missing_ok=True)


def _is_stale(tmp: Path) -> bool:
    """Whether the builder of `tmp` is gone: a dead pid on this host, else no heartbeat for STALE_AFTER_S."""
    try:
        owner = json.loads((tmp / OWNER_FILE).read_text())
        host, pid = owner["host"], int(owner["pid"])
        touched = (tmp / OWNER_FILE).stat().st_mtime
    except (OSError, ValueError, KeyError, TypeError):
        host = pid = None
        suffix = tmp.name.rsplit("-", 1)[-1]
        if suffix.isdigit():  # a single-process build names its folder by pid; the pid tells on this host
            host, pid = socket.gethostname(), int(suffix)
        try:
            touched = tmp.stat().st_mtime
        except OSError:
            return False  # already removed by someone else
    if host == socket.gethostname():
        return pid == os.getpid() or not _pid_alive(pid)  # our own pid: a leftover of an earlier failed build
    return time.time() - touched > STALE_AFTER_S


def remove_stale_builds(cache_dir: Path, key: str) -> None:
    """Delete `<key>.tmp-*` folders whose builder is gone (a crash, a kill, a dead rank left them behind)."""
    for tmp in cache_dir.glob(f"{key}.tmp-*"):
        if _is_stale(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
