"""Sharded feature-cache builds: 2 gloo ranks in forked processes (fast: no re-import), on a fake backbone.

A sharded build must write the bytes of a single-process build, each rank computing only its shard; every
failure (a dataset that differs between ranks, no shared filesystem, a lost part, a full disk, a dead rank) is
one line naming the rank and the folder on every rank, and leaves no published cache and no temporary folder.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from data_fixtures import FakeBackbone, make_folder

from shared.data import build_dataset, cache_disk, cache_shards
from shared.data.cache_shards import shard_rows
from shared.data.feature_cache import FeatureCache

PUBLISHED = {"features.f16", "labels.i16", "meta.json"}


def _rank_main(target, rank: int, world: int, store: str, result: str) -> None:
    torch.set_num_threads(1)  # a forked child must not touch the parent's OpenMP pool
    outcome: dict
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        try:
            outcome = {"ok": target(rank)}
        finally:
            dist.destroy_process_group()
    except BaseException as err:  # noqa: BLE001 - reported to the test
        outcome = {"error": str(err), "type": type(err).__name__, "trace": traceback.format_exc()}
    Path(result).write_text(json.dumps(outcome))
    os._exit(0)  # skip pytest's exit handlers inherited through fork


def run_ranks(tmp_path: Path, target, world: int = 2, timeout: float = 60) -> list[dict]:
    """target(rank) in `world` forked processes joined in one gloo group; what each returned or raised."""
    context = multiprocessing.get_context("fork")
    run = tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}"
    run.mkdir()
    procs = [context.Process(target=_rank_main, args=(target, rank, world, str(run / "store"), str(run / f"{rank}")))
             for rank in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
    return [json.loads((run / f"{rank}").read_text()) if (run / f"{rank}").exists() else {"exit": proc.exitcode}
            for rank, proc in enumerate(procs)]


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    make_folder(tmp_path / "camvid", {f"f{i}": rng.integers(0, 12, size=(24, 32)) for i in range(5)})
    return build_dataset("camvid", "train", data_root=tmp_path, resolution=16)


def test_shards_are_contiguous_batch_aligned_and_cover_every_row():
    assert shard_rows(5, 2, 2) == [range(0, 4), range(4, 5)]
    assert shard_rows(10, 4, 3) == [range(0, 4), range(4, 8), range(8, 10)]
    assert shard_rows(3, 16, 2) == [range(0, 3), range(3, 3)]  # fewer batches than ranks: an empty shard
    for n, batch, world in [(100, 16, 8), (7, 1, 3), (64, 16, 4)]:
        rows = [i for shard in shard_rows(n, batch, world) for i in shard]
        assert rows == list(range(n))
        assert all(shard.start % batch == 0 or shard.start == n for shard in shard_rows(n, batch, world))


def test_two_ranks_write_the_bytes_of_one_process_each_computing_its_shard(tmp_path, dataset):
    reference = FeatureCache(tmp_path / "single").get(FakeBackbone(), dataset, batch_size=2, progress=False)
    backbone = FakeBackbone()

    def build(rank):
        cached = FeatureCache(tmp_path / "shared").get(backbone, dataset, batch_size=2, progress=False)
        seen = backbone.images_seen
        FeatureCache(tmp_path / "shared").get(backbone, dataset, batch_size=2, progress=False)  # a hit
        return {"seen": seen, "seen_after_hit": backbone.images_seen, "path": str(cached.path), "key": cached.key}

    results = run_ranks(tmp_path, build)
    assert all("ok" in r for r in results), results
    assert [r["ok"]["seen"] for r in results] == [4, 1]  # shards 0..4 and 4..5 of 3 batches of 2
    assert [r["ok"]["seen_after_hit"] for r in results] == [4, 1]
    path = Path(results[0]["ok"]["path"])
    assert results[1]["ok"]["path"] == str(path) and path.name == reference.key
    assert {p.name for p in path.iterdir()} == PUBLISHED  # no parts, no owner file
    assert [p.name for p in (tmp_path / "shared").iterdir()] == [path.name]  # no temporary folder left
    for name in ("features.f16", "labels.i16"):
        assert (path / name).read_bytes() == (reference.path / name).read_bytes(), name
    meta = json.loads((path / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["features_sha1"] == reference.meta["features_sha1"]
    assert meta["features_shape"] == [5, 6, 2, 2] and 0 <= meta["publish_seconds"] < 5


def _assert_nothing_left(cache_dir: Path) -> None:
    left = sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []
    assert left == [], left


def _errors(results: list[dict]) -> list[str]:
    assert all("error" in r for r in results), results
    messages = [r["error"] for r in results]
    assert all("\n" not in m for m in messages), messages  # one line each
    return messages


def test_failures_are_one_line_on_every_rank_and_publish_nothing(tmp_path, dataset, monkeypatch):
    make_folder(tmp_path / "other" / "camvid", {f"f{i}": np.zeros((24, 32)) for i in range(4)})
    fewer = build_dataset("camvid", "train", data_root=tmp_path / "other", resolution=16)
    monkeypatch.setattr(cache_shards, "VISIBLE_TIMEOUT_S", 0.5)  # forked ranks inherit it: no 30 s wait

    def scenario(rank, name):
        backbone, ds, cache_dir = FakeBackbone(), dataset, tmp_path / name
        if name == "mismatch" and rank == 1:
            ds = fewer
        if name == "no_shared_fs":
            cache_dir = cache_dir / f"node{rank}"
        if name == "lost_part" and rank == 1:
            write = cache_shards._write_part
            cache_shards._write_part = lambda job, plan, tmp, *rest: (
                write(job, plan, tmp, *rest), (tmp / "part-1" / "part.json").unlink())
        if name == "disk_full" and rank == 1:
            def full(fd, nbytes):
                raise OSError(errno.ENOSPC, "No space left on device")
            cache_disk._reserve = full
        batch_size = 3 if name == "batch_size" and rank == 1 else 2
        FeatureCache(cache_dir).get(backbone, ds, batch_size=batch_size, progress=False)

    names = ["mismatch", "no_shared_fs", "lost_part", "disk_full", "batch_size"]

    def all_scenarios(rank):
        out = {}
        for name in names:
            try:
                scenario(rank, name)
                out[name] = None
            except Exception as err:  # noqa: BLE001
                out[name] = f"{type(err).__name__}: {err}"
        return out

    results = run_ranks(tmp_path, all_scenarios)
    assert all("ok" in r for r in results), results
    for name in names:
        messages = [r["ok"][name] for r in results]
        assert all(m and "\n" not in m for m in messages), (name, messages)
        assert messages[0] == messages[1], name  # every rank raises the same line
        assert "ShardedCacheError" in messages[0] and "rank 1" in messages[0], (name, messages[0])
        _assert_nothing_left(tmp_path / name / "node0" if name == "no_shared_fs" else tmp_path / name)
    mismatch, no_fs, lost, full, batch = (results[0]["ok"][n] for n in names)
    assert "has dataset" in mismatch and "4" in mismatch and str(tmp_path / "other") in mismatch
    assert "shared filesystem" in no_fs and str(tmp_path / "no_shared_fs" / "node1") in no_fs
    assert "part 1 is missing" in lost and "part-1" in lost
    assert "No space left" in full and "part-1" in full and "use_cache=false" in full
    assert "batch_size 3 but rank 0 with 2" in batch


def test_a_rank_that_dies_mid_build_fails_the_others_and_publishes_nothing(tmp_path, dataset):

    class DiesOnRank1(FakeBackbone):
        def forward(self, images):
            if dist.get_rank() == 1:
                os._exit(1)  # a killed process: no exception, no cleanup
            return super().forward(images)

    results = run_ranks(tmp_path, lambda rank: FeatureCache(tmp_path / "cache").get(
        DiesOnRank1(), dataset, batch_size=2, progress=False) and None)
    assert results[1] == {"exit": 1}
    assert "error" in results[0] and "\n" not in results[0]["error"], results[0]
    assert results[0]["error"].startswith("rank 0 (") and "Ranks 1 failed" in results[0]["error"]
    _assert_nothing_left(tmp_path / "cache")  # rank 0 outlived it and removed the folder
    again = FeatureCache(tmp_path / "cache").get(FakeBackbone(), dataset, batch_size=2, progress=False)
    assert again.features.shape == (5, 6, 2, 2)


def test_a_failure_before_the_first_batch_stops_every_rank_early(tmp_path, dataset):
    def build(rank):
        backbone = FakeBackbone()
        if rank == 0:  # slower to start than rank 1 is to fail
            write = cache_shards._write_part
            cache_shards._write_part = lambda *args: (time.sleep(1.0), write(*args))
        else:
            def full(fd, nbytes):
                raise OSError(errno.ENOSPC, "No space left on device")
            cache_disk._reserve = full
        try:
            FeatureCache(tmp_path / "cache").get(backbone, dataset, batch_size=2, progress=False)
        finally:
            (tmp_path / f"seen{rank}").write_text(str(backbone.images_seen))

    first, second = _errors(run_ranks(tmp_path, build))
    assert first == second and first.startswith("rank 1 (") and "No space left in" in first
    assert (tmp_path / "seen0").read_text() == "2"  # rank 0 stopped after its first batch of its 2
    _assert_nothing_left(tmp_path / "cache")
