"""Feature cache: atomic builds, hits without backbone calls, keys that follow what determines the features, disk
planned before it is spent, leftovers of dead builders removed. Sharded builds: test_data_cache_shards.py."""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import warnings

import numpy as np
import pytest
import torch
from data_fixtures import FakeBackbone, make_folder
from PIL import Image

from shared.data import build_dataset, cache_check, cache_disk, cache_files
from shared.data.feature_cache import CacheSpaceError, FeatureCache, cache_bytes, cache_key


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    make_folder(tmp_path / "camvid", {f"f{i}": rng.integers(0, 12, size=(24, 32)) for i in range(5)})
    return build_dataset("camvid", "train", data_root=tmp_path, resolution=16)


def reference(backbone, dataset, flip=False) -> np.ndarray:
    """Features computed directly, one image at a time."""
    with torch.no_grad():
        out = [backbone(dataset[i]["image"][None].flip(-1) if flip else dataset[i]["image"][None])
               for i in range(len(dataset))]
    return torch.cat(out).numpy()


def test_build_then_hit_matches_fresh_computation(tmp_path, dataset):
    backbone = FakeBackbone()
    cache = FeatureCache(tmp_path / "cache")
    built = cache.get(backbone, dataset, batch_size=2, progress=False)
    expected = reference(FakeBackbone(), dataset)
    assert built.features.dtype == np.float16 and built.features.shape == (5, 6, 2, 2) and len(built) == 5
    np.testing.assert_allclose(built.features, expected, rtol=2e-3, atol=2e-3)
    labels = np.stack([dataset[i]["label"].numpy() for i in range(5)])
    assert built.labels.dtype == np.int16 and built.labels.shape == (5, 16, 16)
    np.testing.assert_array_equal(built.labels, labels)
    seen = backbone.images_seen
    hit = cache.get(backbone, dataset, batch_size=2, progress=False)
    assert backbone.images_seen == seen  # no backbone call on a hit
    np.testing.assert_array_equal(hit.features, built.features)
    assert hit.key == built.key and hit.meta["n_images"] == 5


def test_flip_features_are_of_the_flipped_images_labels_unflipped(tmp_path, dataset):
    cached = FeatureCache(tmp_path / "cache").get(FakeBackbone(), dataset, flip=True, progress=False)
    np.testing.assert_allclose(cached.features, reference(FakeBackbone(), dataset, flip=True), rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(cached.labels[0], dataset[0]["label"].numpy())


def test_interrupted_build_is_never_taken_as_complete(tmp_path, dataset):
    cache = FeatureCache(tmp_path / "cache")
    backbone = FakeBackbone()
    backbone.fail_after = 2
    with pytest.raises(KeyboardInterrupt):
        cache.get(backbone, dataset, batch_size=2, progress=False)
    assert not cache.path_for(backbone, dataset).exists()
    assert list((tmp_path / "cache").iterdir()) == []  # the partial folder was removed
    backbone.fail_after, backbone.images_seen = None, 0
    done = cache.get(backbone, dataset, batch_size=2, progress=False)
    assert backbone.images_seen == 5
    np.testing.assert_allclose(done.features, reference(FakeBackbone(), dataset), rtol=2e-3, atol=2e-3)


def test_leftover_of_a_killed_build_is_ignored_and_removed(tmp_path, dataset):
    cache = FeatureCache(tmp_path / "cache")
    backbone = FakeBackbone()
    key = cache_key(backbone, dataset)
    dead_pid = 2**22 + 12345  # above the default pid_max, so no process has it
    stale = tmp_path / "cache" / f"{key}.tmp-{dead_pid}"
    stale.mkdir(parents=True)
    (stale / "features.f16").write_bytes(b"\0" * 10)
    cache.get(backbone, dataset, progress=False)
    assert not stale.exists() and backbone.images_seen == 5


def test_inconsistent_final_folder_is_rebuilt(tmp_path, dataset):
    cache = FeatureCache(tmp_path / "cache")
    backbone = FakeBackbone()
    path = cache.get(backbone, dataset, progress=False).path
    with open(path / "features.f16", "r+b") as f:
        f.truncate(8)
    with pytest.warns(UserWarning, match="incomplete"):
        again = cache.get(backbone, dataset, progress=False)
    assert backbone.images_seen == 10 and again.features.shape == (5, 6, 2, 2)
    assert json.loads((path / "meta.json").read_text())["features_shape"] == [5, 6, 2, 2]


def test_key_changes_with_weights_flip_layer_and_dataset(tmp_path, dataset):
    base = cache_key(FakeBackbone(), dataset)
    assert cache_key(FakeBackbone(), dataset) == base
    assert cache_key(FakeBackbone(weights_id="other"), dataset) != base
    assert cache_key(FakeBackbone(layer=-2), dataset) != base
    assert cache_key(FakeBackbone(), dataset, flip=True) != base
    bf16 = FakeBackbone()
    bf16.use_bf16 = True
    assert cache_key(bf16, dataset) != base
    other_res = build_dataset("camvid", "train", data_root=dataset.root.parent, resolution=24)
    assert cache_key(FakeBackbone(), other_res) != base


def test_unlabelled_dataset_has_no_labels_file(tmp_path):
    make_folder(tmp_path / "plain", {"a": None, "b": None})
    ds = build_dataset("folder", "train", data_root=tmp_path / "plain", resolution=16)
    cached = FeatureCache(tmp_path / "cache").get(FakeBackbone(), ds, progress=False)
    assert cached.labels is None and not os.path.exists(cached.path / "labels.i16")


def test_building_a_cache_leaves_the_global_random_stream_alone(tmp_path, dataset):
    # A trainer seeds, builds its caches (on rank 0 only under DDP), then initialises its weights: the build
    # must not consume global random numbers, or the weights would depend on whether the cache existed.
    backbone = FakeBackbone()  # built first: its Conv2d initialisation draws from the global stream
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    FeatureCache(tmp_path / "cache").get(backbone, dataset, batch_size=2, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_crafted_cache_files_run_nothing_and_are_rebuilt(tmp_path, dataset, crafted_file):
    """The cache reads raw memmaps and JSON only: a pickle payload in place of any of its files is never run."""
    cache = FeatureCache(tmp_path / "cache")
    folder = cache.path_for(FakeBackbone(), dataset)
    crafted = crafted_file("crafted.bin")
    folder.mkdir(parents=True)
    for name in ("features.f16", "labels.i16", "meta.json"):
        (folder / name).write_bytes(crafted.path.read_bytes())
    with pytest.warns(UserWarning, match="incomplete or inconsistent; rebuilding"):
        cached = cache.get(FakeBackbone(), dataset, progress=False)
    assert not crafted.marker.exists()
    np.testing.assert_allclose(cached.features, reference(FakeBackbone(), dataset), rtol=2e-3, atol=2e-3)


def test_files_have_the_planned_size_and_the_plan_is_printed_first(tmp_path, dataset, capsys):
    cached = FeatureCache(tmp_path / "cache").get(FakeBackbone(), dataset, progress=False)
    sizes = sum((cached.path / name).stat().st_size for name in ("features.f16", "labels.i16"))
    assert sizes == cache_bytes(5, 6, 2, 16) == 5 * 6 * 2 * 2 * 2 + 5 * 16 * 16 * 2
    assert cache_bytes(5, 6, (2, 3), 16, labels=False) == 5 * 6 * 2 * 3 * 2
    printed = capsys.readouterr().out
    assert f"5 images x 6 x 2x2 x 2 B + labels 5 x 16x16 x 2 B = 2.7 KiB in {tmp_path / 'cache'}" in printed


def test_too_little_free_space_is_refused_before_any_work(tmp_path, dataset, monkeypatch):
    monkeypatch.setattr(cache_disk, "free_bytes", lambda folder: cache_disk.DISK_MARGIN_BYTES + 100)
    cache, backbone = FeatureCache(tmp_path / "cache"), FakeBackbone()
    with pytest.raises(CacheSpaceError) as caught:
        cache.get(backbone, dataset, progress=False)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "cache") in message and "2.7 KiB" in message
    for option in ("no flip for the training split", "five_crop=false", "use_cache=false"):
        assert option in message
    assert backbone.images_seen == 0 and list((tmp_path / "cache").iterdir()) == []


def test_a_full_disk_at_allocation_is_one_line_and_leaves_no_folder(tmp_path, dataset, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    cache, backbone = FeatureCache(tmp_path / "cache"), FakeBackbone()
    with pytest.raises(CacheSpaceError, match=r"No space left in .*\.tmp-\d+ for the feature cache") as caught:
        cache.get(backbone, dataset, progress=False)
    assert "\n" not in str(caught.value) and "use_cache=false" in str(caught.value)
    assert backbone.images_seen == 0 and list((tmp_path / "cache").iterdir()) == []


def test_a_filesystem_without_fallocate_still_builds(tmp_path, dataset, monkeypatch):
    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    cached = FeatureCache(tmp_path / "cache").get(FakeBackbone(), dataset, progress=False)
    np.testing.assert_allclose(cached.features, reference(FakeBackbone(), dataset), rtol=2e-3, atol=2e-3)


def _leftover(cache_dir, name, host, pid, age_s):
    folder = cache_dir / name
    folder.mkdir(parents=True)
    owner = folder / "owner.json"
    owner.write_text(json.dumps({"host": host, "pid": pid, "run_id": name}))
    os.utime(owner, (time.time() - age_s, time.time() - age_s))
    return folder


def test_leftovers_of_other_hosts_are_judged_by_their_heartbeat(tmp_path, dataset):
    cache, backbone = FeatureCache(tmp_path / "cache"), FakeBackbone()
    key = cache_key(backbone, dataset)
    dead_pid = 2**22 + 12345
    old = cache_files.STALE_AFTER_S + 60
    silent = _leftover(tmp_path / "cache", f"{key}.tmp-raaaa", "other-node", 1, age_s=old)
    beating = _leftover(tmp_path / "cache", f"{key}.tmp-rbbbb", "other-node", 1, age_s=5)
    dead_here = _leftover(tmp_path / "cache", f"{key}.tmp-rcccc", socket.gethostname(), dead_pid, age_s=5)
    alive_here = _leftover(tmp_path / "cache", f"{key}.tmp-rdddd", socket.gethostname(), os.getppid(), age_s=old)
    cache.get(backbone, dataset, progress=False)
    assert not silent.exists() and not dead_here.exists()  # no heartbeat for too long; a dead pid on this host
    assert beating.exists() and alive_here.exists()  # a live build elsewhere; a live pid here, however quiet


def test_a_label_edited_in_place_with_the_same_size_is_a_new_cache(tmp_path, dataset):
    cache, backbone = FeatureCache(tmp_path / "cache"), FakeBackbone()
    label_file = dataset.root / dataset.samples[0][1]
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 12, (24, 32)).astype(np.uint8)).save(label_file, compress_level=0)
    dataset = build_dataset("camvid", "train", data_root=tmp_path, resolution=16)
    old = cache.get(backbone, dataset, progress=False)
    size, mtime = label_file.stat().st_size, label_file.stat().st_mtime_ns
    edited = rng.integers(0, 12, (24, 32)).astype(np.uint8)
    Image.fromarray(edited).save(label_file, compress_level=0)  # uncompressed: the same byte count
    os.utime(label_file, ns=(mtime + 10**9, mtime + 10**9))  # as a filesystem with coarse timestamps would show it
    assert label_file.stat().st_size == size
    again = build_dataset("camvid", "train", data_root=tmp_path, resolution=16)
    new = cache.get(backbone, again, progress=False)
    assert new.key != old.key and backbone.images_seen == 10
    np.testing.assert_array_equal(new.labels[0], again[0]["label"].numpy())
    assert not np.array_equal(new.labels[0], old.labels[0])


def edit_in_place(path, byte_offset: int) -> None:
    """Add 1 to the float16 at `byte_offset` of a features file: finite values, same size."""
    data = np.memmap(path, dtype=np.float16, mode="r+")
    data[byte_offset // 2] = data[byte_offset // 2] + np.float16(1)
    data.flush()
    del data


@pytest.mark.parametrize("offset, cheap_catches", [(0, True), (116, True), (236, True), (60, False), (180, False)])
def test_an_array_edited_in_place_is_caught_by_verify_and_by_the_sampled_blocks(tmp_path, dataset, monkeypatch,
                                                                                offset, cheap_catches):
    monkeypatch.setattr(cache_check, "SAMPLE_BLOCK", 16)  # 240-byte features: blocks at 0, 112 and 224
    cache, backbone = FeatureCache(tmp_path / "cache"), FakeBackbone()
    built = cache.get(backbone, dataset, batch_size=2, progress=False)
    assert built.features.nbytes == 240
    good = np.array(built.features)
    edit_in_place(built.path / "features.f16", offset)
    assert np.isfinite(np.fromfile(built.path / "features.f16", dtype=np.float16)).all()
    if not cheap_catches:  # the edit lies between the sampled blocks: only the full check sees it
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not np.array_equal(cache.get(backbone, dataset, batch_size=2, progress=False).features, good)
        assert backbone.images_seen == 5
    with pytest.warns(UserWarning, match=rf"{built.path.name}.*(sampled blocks|recorded sha1).*rebuilding"):
        again = cache.get(backbone, dataset, batch_size=2, progress=False, verify=not cheap_catches)
    assert backbone.images_seen == 10
    np.testing.assert_array_equal(again.features, good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.get(backbone, dataset, batch_size=2, progress=False, verify=True)  # the rebuilt cache passes both
    assert backbone.images_seen == 10


def test_an_edited_label_array_is_caught_by_verify(tmp_path, dataset):
    cache, backbone = FeatureCache(tmp_path / "cache"), FakeBackbone()
    built = cache.get(backbone, dataset, progress=False)
    labels = np.memmap(built.path / "labels.i16", dtype=np.int16, mode="r+")
    labels[3] = (labels[3] + 1) % 12
    labels.flush()
    del labels
    with pytest.warns(UserWarning, match="labels.i16"):
        again = cache.get(backbone, dataset, progress=False, verify=True)
    np.testing.assert_array_equal(again.labels, np.stack([dataset[i]["label"].numpy() for i in range(5)]))
