"""A feature cache built by every rank of a torchrun job at once, published by rank 0.

    <key>.tmp-<run id>/part-<rank>/{features.f16, labels.i16, part.json}   # each rank: its contiguous shard
    -> rank 0 checks every part (rows, shapes, sha1) and concatenates them into
    <key>.tmp-<run id>/{features.f16, labels.i16, meta.json} -> rename to <key>/   # what readers open

Shards are cut at batch boundaries, so every batch is the batch a single process would have run and the bytes
are those of a single-process build with the same batch size. The ranks talk over gloo groups of their own
(small CPU messages whichever backend trains). After every rank's first batch they gather its time; the slowest
times the largest shard's batches is the expected build time, from which a second group takes its timeout and
every long wait (`monitored_barrier` on it) its own, so no build length can hit a default timeout. A failure on
any rank is gathered and raised on every rank as one line naming the rank and the folder; nothing is published.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

from shared.atomic_io import atomic_write_text
from shared.data.cache_disk import check_free_space, human_bytes
from shared.data.cache_files import (
    FEATURES_FILE,
    LABELS_FILE,
    META_FILE,
    OWNER_FILE,
    BuildJob,
    CachedFeatures,
    Plan,
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

PART_FILE = "part.json"
CONTROL_TIMEOUT_S = 600.0  # exchanges where every rank is already present (they take milliseconds)
MIN_WAIT_S = 300.0  # added to every long wait: start-up skew, data-loader warm-up, a slow filesystem
WAIT_SLACK = 2.0  # the parts are waited for this many times the expected build time (plus MIN_WAIT_S)
COPY_FLOOR_BPS = 50e6  # the slowest concatenation rate (bytes/s) rank 0's publish is waited for
VISIBLE_TIMEOUT_S = 30.0  # how long a rank polls for a folder another rank made (NFS caches a name's absence)
COPY_CHUNK = 16 << 20


class ShardedCacheError(RuntimeError):
    """A sharded cache build failed on some rank; raised on every rank with the same one-line message."""


def shard_rows(n_images: int, batch_size: int, world: int) -> list[range]:
    """Contiguous rows of each rank, cut at batch boundaries (so each batch is the single-process batch)."""
    n_batches = math.ceil(n_images / batch_size)
    per, extra = divmod(n_batches, world)
    bounds, first = [], 0
    for rank in range(world):
        last = first + per + (1 if rank < extra else 0)
        bounds.append(range(min(first * batch_size, n_images), min(last * batch_size, n_images)))
        first = last
    return bounds


def dataset_fingerprint(dataset) -> dict:
    """What must agree across ranks: the files (names, sizes and modification times, not the root), count, split
    and view."""
    return {"cache_id": dataset.cache_id, "n_images": len(dataset)}


class _PeerFailed(Exception):
    """Another rank failed before its first batch: stop this rank's part early (its error is raised later)."""


class _Ranks:
    """This rank's view of the job: a private gloo group for control messages (every rank present, quick), and
    once the build's pace is known (`pace`), a second group whose timeout covers the long waits."""

    def __init__(self) -> None:
        self.rank, self.world, self.host = dist.get_rank(), dist.get_world_size(), socket.gethostname()
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=CONTROL_TIMEOUT_S))
        self.wait_group = None

    @property
    def me(self) -> str:
        return f"rank {self.rank} ({self.host})"

    def gather(self, obj, *, named: bool = False) -> list:
        """all_gather_object; with `named`, a monitored barrier first, so rank 0 can name a rank that is gone."""
        out = [None] * self.world
        try:
            if named:
                dist.monitored_barrier(group=self.group, timeout=timedelta(seconds=CONTROL_TIMEOUT_S),
                                       wait_all_ranks=True)
            dist.all_gather_object(out, obj, group=self.group)
        except RuntimeError as err:
            raise ShardedCacheError(f"{self.me} lost contact with the other ranks ({_first_line(err)}); a rank died. "
                                    "Nothing was published.") from None
        return out

    def broadcast(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def pace(self, per_batch_s: float | None, error: str | None, n_batches: int, publish_s: float) -> list:
        """Gather every rank's first-batch time (or early error) and open the wait group; returns the errors.

        The slowest rank's batch time x the largest shard's batches is the expected build time; the wait group's
        timeout is WAIT_SLACK times that plus the publish allowance, so no wait below can outlast it.
        """
        paces = self.gather((per_batch_s, error), named=True)
        per_batch = max((s for s, _ in paces if s is not None), default=0.0)
        self.parts_timeout_s = MIN_WAIT_S + WAIT_SLACK * per_batch * n_batches
        self.publish_timeout_s = publish_s
        self.wait_group = dist.new_group(backend="gloo",
                                         timeout=timedelta(seconds=self.parts_timeout_s + publish_s))
        return [e for _, e in paces if e]

    def wait(self, timeout_s: float, what: str, cleanup: Callable[[], None], own_error: str | None = None) -> None:
        """Barrier with an explicit timeout; on a timeout or a dead peer, one line naming who did not arrive.

        monitored_barrier enforces `timeout_s` on rank 0 (which then names the missing ranks and, by leaving,
        releases the others); the other ranks are bounded by the wait group's timeout. A rank that already failed
        reports its own error: that, not the wait, is what went wrong.
        """
        try:
            dist.monitored_barrier(group=self.wait_group, timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
        except RuntimeError as err:
            cleanup()
            gave_up = f"gave up after {timeout_s:.0f} s waiting for {what} ({_first_line(err)})"
            if own_error:
                raise ShardedCacheError(f"{own_error} (then {gave_up})") from None
            raise ShardedCacheError(f"{self.me} {gave_up}; a rank died or hung. Nothing was published; whatever "
                                    "rank 0 could not remove, the next build does.") from None

    def agree(self, error: str | None, cleanup: Callable[[], None] = lambda: None) -> None:
        """Raise the first rank's error on every rank (after `cleanup`) if any rank has one."""
        errors = [e for e in self.gather(error) if e]
        if errors:
            cleanup()
            more = f" ({len(errors) - 1} more rank(s) failed too)" if len(errors) > 1 else ""
            raise ShardedCacheError(errors[0] + more)

    def close(self) -> None:
        for group in (self.wait_group, self.group):
            if group is not None:
                dist.destroy_process_group(group)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _poll(predicate: Callable[[], object], timeout_s: float) -> object:
    """predicate() until it is truthy or `timeout_s` passed; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(0.2)


def _check_same_job(views: list[dict], path: Path) -> None:
    """Every rank must build the same dataset into the same cache (same key), seen the same way."""
    first = views[0]
    for rank, view in enumerate(views):
        who = f"rank {rank} ({view['host']})"
        if view["dataset"] != first["dataset"]:
            mine, theirs = view["dataset"], first["dataset"]
            raise ShardedCacheError(
                f"{who} has dataset {mine['cache_id']} with {mine['n_images']} images (root {view['root']}) but rank 0 "
                f"({first['host']}) has {theirs['cache_id']} with {theirs['n_images']} (root {first['root']}); every "
                "rank must read the same files: check data_root, split, resolution and five_crop on every node, and "
                "copy the data with its modification times (rsync -a, cp -p).")
        if view["batch_size"] != first["batch_size"]:
            raise ShardedCacheError(f"{who} builds with batch_size {view['batch_size']} but rank 0 with "
                                    f"{first['batch_size']}; the shards are cut at batch boundaries, so every rank "
                                    "must use the same batch size.")
        if view["key"] != first["key"]:
            raise ShardedCacheError(f"{who} would build feature cache {view['key']} but rank 0 builds {first['key']}; "
                                    "the backbone, its weights or the descriptor differ between ranks.")
    if len({v["found"] for v in views}) > 1:
        missing = [f"rank {r} ({v['host']})" for r, v in enumerate(views) if not v["found"]]
        raise ShardedCacheError(f"{', '.join(missing)} cannot see the finished feature cache {path} that other ranks "
                                "see; every rank must see the same cache_dir on a shared filesystem.")


def get_sharded(job: BuildJob, *, verify: bool = False) -> CachedFeatures:
    """Open the cache, building it sharded over every rank when missing or failing its check (every rank calls
    this). With `verify` every rank hashes the whole cache before the ranks meet, so none waits for another."""
    ranks = _Ranks()
    try:
        found, problem = read_cache(job.path, verify=verify)
        view = {"host": ranks.host, "dataset": dataset_fingerprint(job.dataset), "root": str(job.dataset.root),
                "key": job.path.name, "batch_size": job.batch_size, "found": found is not None}
        views = ranks.gather(view)
        _check_same_job(views, job.path)
        if not views[0]["found"]:
            _build(job, ranks, problem)
        return _open_everywhere(job.path, ranks)
    finally:
        ranks.close()


def _prepare(job: BuildJob, plan: Plan, shards: list[range], problem: str | None) -> str:
    """Rank 0: clean up, print the plan, check the free space, make the temporary folder."""
    prepare_folder(job, problem)
    largest = max(len(rows) for rows in shards)
    # Concatenation writes the final files while the parts still exist: the largest part is the overhead.
    needed = plan.total_bytes + plan.rows_bytes(largest)
    print(f"{plan.describe(job.path.name)} in {job.cache_dir}; {len(shards)} ranks, up to {largest} images each, "
          f"{human_bytes(needed)} at the peak of assembly", flush=True)
    check_free_space(job.cache_dir, needed, f"Feature cache {job.path.name} (sharded over {len(shards)} ranks)")
    name = f"{job.path.name}.tmp-r{secrets.token_hex(6)}"
    (job.cache_dir / name).mkdir()
    return name


def _build(job: BuildJob, ranks: _Ranks, problem: str | None = None) -> None:
    """Every rank writes its part; rank 0 checks the parts and publishes. Raises on every rank on failure."""
    name, plan, error = None, None, None
    if ranks.rank == 0:
        try:
            plan = plan_build(job)
            name = _prepare(job, plan, shard_rows(plan.n_images, job.batch_size, ranks.world), problem)
        except Exception as err:  # noqa: BLE001 - reported on every rank below
            error = f"{ranks.me}: {err}"
    # The name, not the path: each rank joins it to its own cache_dir, so a missing shared filesystem shows.
    name, plan, error = ranks.broadcast((name, plan, error))
    if error:
        raise ShardedCacheError(error)
    tmp, shards = job.cache_dir / name, shard_rows(plan.n_images, job.batch_size, ranks.world)
    remove = (lambda: shutil.rmtree(tmp, ignore_errors=True)) if ranks.rank == 0 else (lambda: None)
    try:
        if ranks.rank == 0:
            with owned(tmp, run_id=tmp.name):  # heartbeat for the whole build, waits included
                _build_in(job, plan, shards, tmp, ranks, remove)
        else:
            _build_in(job, plan, shards, tmp, ranks, remove)
    except BaseException:
        remove()  # rank 0 (an interrupt, an error): never leave a half-built folder behind while alive
        raise


def _build_in(job: BuildJob, plan: Plan, shards: list[range], tmp: Path, ranks: _Ranks, remove) -> None:
    """See the folder, write this rank's part, wait for all parts; rank 0 checks and publishes while all wait."""
    seen = _poll(lambda: (tmp / OWNER_FILE).exists(), VISIBLE_TIMEOUT_S)
    ranks.agree(None if seen else f"{ranks.me} cannot see {tmp / OWNER_FILE}, which rank 0 created; every rank must "
                "see the same cache_dir on a shared filesystem (check cache_dir on every node).", remove)
    n_batches = math.ceil(max(len(rows) for rows in shards) / job.batch_size)
    publish_s = MIN_WAIT_S + plan.total_bytes / COPY_FLOOR_BPS
    paced, error = False, None

    def first_batch(seconds: float | None, failed: str | None = None) -> None:
        nonlocal paced
        if not paced:
            paced = True
            if ranks.pace(seconds, failed, n_batches, publish_s) and failed is None:
                raise _PeerFailed

    started = time.perf_counter()
    try:
        _write_part(job, plan, tmp, ranks, shards[ranks.rank], first_batch)
    except _PeerFailed:
        pass  # its error is raised below, on every rank
    except ShardedCacheError:
        raise  # lost contact with the other ranks: no collective can follow
    except Exception as err:  # noqa: BLE001 - reported on every rank below
        error = f"{ranks.me} could not write its part {tmp / f'part-{ranks.rank}'}: {err}"
    first_batch(None, error)  # an empty shard, or a failure before the first batch, still joins the pace
    elapsed = time.perf_counter() - started
    ranks.wait(ranks.parts_timeout_s, f"every rank's part of {tmp}", remove, error)
    ranks.agree(error, remove)
    if ranks.rank == 0:
        try:
            _check_and_publish(job, plan, shards, tmp, build_seconds=elapsed)
        except Exception as err:  # noqa: BLE001 - reported on every rank below
            error = f"{ranks.me} could not publish {job.path}: {err}"
    ranks.wait(ranks.publish_timeout_s, f"rank 0 to check and publish {job.path}", remove, error)
    ranks.agree(error, remove)


def _write_part(job: BuildJob, plan: Plan, tmp: Path, ranks: _Ranks, rows: range, first_batch) -> None:
    """This rank's rows into part-<rank>/; part.json, written last, marks the part complete."""
    folder = tmp / f"part-{ranks.rank}"
    folder.mkdir()
    bar = tqdm(total=len(rows), unit="img", disable=not (job.progress and ranks.rank == 0),
               desc=f"features {job.dataset.name}/{job.dataset.split} (rank 0 of {ranks.world})")
    with bar, no_space_as_error(folder, plan.rows_bytes(len(rows))):
        written = write_rows(job, plan, folder, rows, bar, on_first_batch=first_batch)
        info = {"rank": ranks.rank, "host": ranks.host, "start": rows.start, "stop": rows.stop, **written}
        atomic_write_text(folder / PART_FILE, json.dumps(info))


def _read_part(tmp: Path, rank: int, rows: range, plan: Plan) -> dict:
    """part.json of `rank`, checked against the rows it should hold and the sizes of its files."""
    folder = tmp / f"part-{rank}"
    try:
        info = json.loads((folder / PART_FILE).read_text())
    except (OSError, ValueError):
        raise ShardedCacheError(f"part {rank} is missing: {folder / PART_FILE} does not exist or is unreadable (rank "
                                f"{rank} did not finish, or writes to another filesystem).") from None
    if (info.get("start"), info.get("stop")) != (rows.start, rows.stop):
        raise ShardedCacheError(f"{folder} holds rows {info.get('start')}..{info.get('stop')} but rank {rank}'s "
                                f"shard is {rows.start}..{rows.stop}; the ranks disagree on the batch size.")
    expected = {FEATURES_FILE: len(rows) * math.prod(plan.feature_shape) * 2}
    if plan.has_labels:
        expected[LABELS_FILE] = len(rows) * plan.resolution**2 * 2
    for name, size in expected.items():
        found = (folder / name).stat().st_size if (folder / name).exists() else None
        if found != size:
            raise ShardedCacheError(f"{folder / name} has {found} bytes but {len(rows)} images need {size}; rank "
                                    f"{rank}'s part is incomplete.")
    return info


def _concatenate(tmp: Path, name: str, parts: list[dict], digest: str) -> str:
    """Append every part's `name` to tmp/`name` in rank order, checking each part's sha1 as it streams by.

    Each part file is deleted once copied, so the disk holds at most the final file plus one part.
    Returns the sha1 of the whole file (equal to a single-process build's).
    """
    whole, buffer = hashlib.sha1(), bytearray(COPY_CHUNK)
    with open(tmp / name, "wb") as out:
        for info in parts:
            source, part_sha = tmp / f"part-{info['rank']}" / name, hashlib.sha1()
            with open(source, "rb") as src:
                while n := src.readinto(buffer):
                    view = memoryview(buffer)[:n]
                    part_sha.update(view)
                    whole.update(view)
                    out.write(view)
            if part_sha.hexdigest() != info[digest]:
                raise ShardedCacheError(f"{source} does not hold the bytes rank {info['rank']} ({info['host']}) wrote "
                                        f"(sha1 {part_sha.hexdigest()[:12]}, expected {info[digest][:12]}); the "
                                        "filesystem lost or reordered writes. Rebuild.")
            source.unlink()
    return whole.hexdigest()


def _check_and_publish(job: BuildJob, plan: Plan, shards: list[range], tmp: Path, build_seconds: float) -> None:
    """Rank 0: check every part, assemble the published layout in `tmp`, write meta.json, rename."""
    started = time.perf_counter()
    parts = [_read_part(tmp, rank, rows, plan) for rank, rows in enumerate(shards)]
    with no_space_as_error(tmp, plan.total_bytes):
        written = {"features_sha1": _concatenate(tmp, FEATURES_FILE, parts, "features_sha1"),
                   "labels_sha1": _concatenate(tmp, LABELS_FILE, parts, "labels_sha1") if plan.has_labels else None,
                   "seconds": build_seconds}
        for info in parts:
            shutil.rmtree(tmp / f"part-{info['rank']}")
        meta = final_meta(job, plan, written, tmp, world_size=len(shards),
                          publish_seconds=round(time.perf_counter() - started, 3))
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=1))  # written last: marks the arrays complete
    (tmp / OWNER_FILE).unlink(missing_ok=True)  # the published folder holds only what readers open
    publish(tmp, job.path)


def _open_everywhere(path: Path, ranks: _Ranks) -> CachedFeatures:
    """Every rank opens the published cache (polling: NFS may remember for a while that it was absent)."""
    cached = _poll(lambda: open_cache(path), VISIBLE_TIMEOUT_S)
    ranks.agree(None if cached else f"{ranks.me} cannot open the feature cache {path} that rank 0 published; every "
                "rank must see the same cache_dir on a shared filesystem.")
    return cached
