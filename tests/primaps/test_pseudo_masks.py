"""The pseudo-mask cache (keyed, validated, rebuilt when corrupt, never reused when a key input changes), the pool
(same masks as one process; a dying worker is reported, not waited on) and the "+SotA" base checks."""

import json
import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest
import torch

from primaps import pseudo_masks as pm
from primaps.pseudo_masks import MaskParams, compute_masks, key_fields, load_or_compute


class TinyImages:
    """A dataset stand-in: smooth random images at 28 px with a cache id and image paths."""

    name, split, resolution = "toy", "train", 28

    def __init__(self, n=4, cache_id="toy-train-r28-aaaa"):
        gen = torch.Generator().manual_seed(0)
        low = torch.randn(n, 3, 4, 4, generator=gen)
        self.images = torch.nn.functional.interpolate(low, size=(28, 28), mode="bilinear")
        self.cache_id = cache_id

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "index": i}

    def image_path(self, i):
        return f"toy/{i}.png"


def features_of(i):
    gen = torch.Generator().manual_seed(100 + i)
    protos = torch.randn(3, 8, generator=gen)
    regions = (torch.arange(4) * 3 // 4).expand(4, 4)
    return (protos[regions].permute(2, 0, 1) + 0.05 * torch.randn(8, 4, 4, generator=gen)).numpy()


def test_pool_equals_one_process_and_masks_are_plausible():
    ds = TinyImages()
    single = compute_masks(ds, features_of, MaskParams(), workers=1, progress=False)
    pooled = compute_masks(ds, features_of, MaskParams(), workers=2, progress=False)
    assert single.shape == (4, 28, 28) and single.dtype == np.uint8
    assert np.array_equal(single, pooled)
    assert (single.reshape(4, -1).max(1) >= 1).all()  # every image gets at least one mask


def _die(index, features, params):
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_dying_worker_is_reported(monkeypatch):
    monkeypatch.setattr(pm, "_worker_job", _die)
    with pytest.raises(RuntimeError, match="worker died on image"):
        compute_masks(TinyImages(), features_of, MaskParams(), workers=2, progress=False, timeout_s=30)


def _hang_on_two(index, features, params):
    if index == 2:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a worker forked inside a training loop's stop handler
        time.sleep(600)
    return pm.pseudo_mask(pm._WORKER_DATASET[index]["image"], torch.from_numpy(features), params)


def test_a_stuck_image_is_named_and_no_worker_is_left(monkeypatch):
    monkeypatch.setattr(pm, "_worker_job", _hang_on_two)
    began = time.monotonic()
    with pytest.raises(TimeoutError, match=r"image\(s\) \[2\] took over 1.0 s"):
        compute_masks(TinyImages(), features_of, MaskParams(), workers=2, progress=False, timeout_s=1.0)
    assert time.monotonic() - began < 30
    assert [p for p in mp.active_children() if p.name == "primaps-worker"] == []


def test_cache_reused_only_for_the_same_key_and_rebuilt_when_corrupt(tmp_path, monkeypatch):
    ds = TinyImages()
    calls = []
    real = pm.compute_masks

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pm, "compute_masks", counting)
    fields = key_fields("featkey", ds, MaskParams(), None)
    first = np.array(load_or_compute(tmp_path, fields, ds, features_of, MaskParams(), workers=1, progress=False))
    again = load_or_compute(tmp_path, fields, ds, features_of, MaskParams(), workers=1, progress=False)
    assert len(calls) == 1 and np.array_equal(first, again)
    # every key input makes a new cache entry
    for other in (key_fields("otherkey", ds, MaskParams(), None),
                  key_fields("featkey", TinyImages(cache_id="toy-train-r28-bbbb"), MaskParams(), None),
                  key_fields("featkey", ds, MaskParams(threshold=0.5), None),
                  key_fields("featkey", ds, MaskParams(), "ab" * 32)):
        assert pm.cache_path(tmp_path, other) != pm.cache_path(tmp_path, fields)
    # flip one byte: the digest check rejects it and the cache is rebuilt, with a warning
    path = pm.cache_path(tmp_path, fields)
    data = bytearray((path / pm.MASKS_FILE).read_bytes())
    data[5] ^= 0xFF
    (path / pm.MASKS_FILE).write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="corrupt"):
        rebuilt = load_or_compute(tmp_path, fields, ds, features_of, MaskParams(), workers=1, progress=False)
    assert len(calls) == 2 and np.array_equal(first, rebuilt)
    # a stale meta (fields of another key) is not trusted either
    meta = json.loads((path / pm.META_FILE).read_text())
    meta["fields"]["params"]["threshold"] = 0.9
    (path / pm.META_FILE).write_text(json.dumps(meta))
    assert pm.open_masks(path, fields) is None
