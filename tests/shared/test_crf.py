"""CRF against a direct pydensecrf call built from the documented parameters; pool behaviour."""

import multiprocessing as mp
import os
import signal
import time
import warnings

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
import torch
import torch.nn.functional as F
from pydensecrf.utils import unary_from_softmax

import shared.crf as crf_module
import shared.worker_pool as worker_pool
from shared.crf import CRFPool, batched_dense_crf, dense_crf

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
ORIGINAL_CRF = crf_module.crf_from_probs


def make_inputs(seed: int, h: int = 30, w: int = 40, c: int = 3):
    rng = np.random.default_rng(seed)
    rgb = np.zeros((h, w, 3), dtype=np.float64)
    rgb[:, : w // 2] = [0.9, 0.2, 0.1]  # two coloured halves, plus noise
    rgb[:, w // 2:] = [0.1, 0.3, 0.8]
    rgb = np.clip(rgb + rng.normal(0, 0.05, rgb.shape), 0, 1)
    rgb = np.round(rgb * 255) / 255  # a real uint8 image, as datasets produce
    image = torch.from_numpy(((rgb - MEAN) / STD).transpose(2, 0, 1)).float()
    logits = torch.from_numpy(rng.normal(0, 1.5, (c, 6, 8))).float()
    return image, logits


def reference_crf(image: torch.Tensor, logits: torch.Tensor) -> np.ndarray:
    rgb = image.double().numpy().transpose(1, 2, 0) * STD + MEAN
    bgr = np.ascontiguousarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)[:, :, ::-1])
    h, w = bgr.shape[:2]
    up = F.interpolate(logits[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    probs = torch.softmax(up, dim=0).numpy()
    c = probs.shape[0]
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs, clip=1e-5)))
    d.addPairwiseGaussian(sxy=1, compat=3)
    d.addPairwiseBilateral(sxy=67, srgb=3, rgbim=bgr, compat=4)
    return np.array(d.inference(10)).reshape(c, h, w)


def test_dense_crf_matches_direct_pydensecrf():
    image, logits = make_inputs(0)
    out = dense_crf(image, logits)
    assert out.dtype == np.float32 and out.shape == (3, 30, 40)
    ref = reference_crf(image, logits)
    assert np.allclose(out, ref, atol=1e-5)
    assert np.allclose(out.sum(axis=0), 1.0, atol=1e-4)
    # the CRF should follow the colour edge more than the raw noisy logits do
    assert (out.argmax(0) != F.interpolate(logits[None], (30, 40), mode="bilinear")[0].argmax(0).numpy()).any()


def test_crf_image_is_bgr_uint8():
    # The exact kernel only sees colour distances, which a channel swap keeps (the permutohedral lattice does
    # not quite), so the originals' BGR order is checked on its own: pure red must come out as (0, 0, 255).
    red = torch.from_numpy((np.array([1.0, 0.0, 0.0]) - MEAN) / STD).float().view(3, 1, 1).expand(3, 2, 3)
    bgr = crf_module.image_to_bgr_uint8(red)
    assert bgr.dtype == np.uint8 and bgr.shape == (2, 3, 3) and bgr.flags["C_CONTIGUOUS"]
    assert (bgr == np.array([0, 0, 255], np.uint8)).all()


def test_batched_equals_single_in_pool_and_in_process():
    pairs = [make_inputs(s) for s in range(3)]
    images = torch.stack([p[0] for p in pairs])
    logits = torch.stack([p[1] for p in pairs])
    singles = [dense_crf(i, lg) for i, lg in pairs]
    pooled = batched_dense_crf(images, logits, workers=2)
    inproc = batched_dense_crf(images, logits, workers=1)
    for s, p, q in zip(singles, pooled, inproc, strict=True):
        assert np.array_equal(s, p) and np.array_equal(s, q)


def _hang_on_four_classes(bgr: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Stand-in for a stuck worker: never finishes on 4-class inputs."""
    if probs.shape[0] == 4:
        time.sleep(600)
    return ORIGINAL_CRF(bgr, probs)


def test_tiny_timeout_returns_none_with_warning_and_pool_recovers():
    pairs = [make_inputs(s) for s in range(2)]
    images, logits = [p[0] for p in pairs], [p[1] for p in pairs]
    with CRFPool(workers=2) as pool:
        with pytest.warns(RuntimeWarning, match="timed out"):
            out = batched_dense_crf(images, logits, pool=pool, timeout_s=1e-9)
        assert out == [None, None]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = pool.run(images, logits, timeout_s=60.0)
    assert np.array_equal(again[1], dense_crf(*pairs[1]))


def test_stuck_worker_is_killed_and_other_images_finish(monkeypatch):
    monkeypatch.setattr(crf_module, "crf_from_probs", _hang_on_four_classes)  # forked workers inherit it
    pairs = [make_inputs(0), make_inputs(1, c=4), make_inputs(2), make_inputs(3)]
    images, logits = [p[0] for p in pairs], [p[1] for p in pairs]
    with CRFPool(workers=2) as pool, pytest.warns(RuntimeWarning, match=r"image\(s\) \[1\]"):
        out = pool.run(images, logits, timeout_s=1.0)
    assert out[1] is None
    for i in (0, 2, 3):
        assert np.array_equal(out[i], ORIGINAL_CRF(*crf_module._prepare(*pairs[i])))


def _timed_job(bgr: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Stands in for the CRF: sleeps 1 s on 4-class inputs, 0.02 s otherwise; returns (start, end) wall times."""
    start = time.time()
    time.sleep(1.0 if probs.shape[0] == 4 else 0.02)
    return np.array([start, time.time()])


def test_a_free_worker_gets_the_next_image_while_another_is_busy(monkeypatch):
    # Regression: the pool used to wait for every busy worker before handing out more work, which made a
    # 2-worker pool no faster than one process. Checked by order of events, not by timing.
    monkeypatch.setattr(crf_module, "crf_from_probs", _timed_job)
    pairs = [make_inputs(0), make_inputs(1, c=4), make_inputs(2), make_inputs(3)]
    with CRFPool(workers=2) as pool:
        spans = pool.run([p[0] for p in pairs], [p[1] for p in pairs], timeout_s=60.0)
    long_job_end = spans[1][1]
    assert spans[2][0] < long_job_end and spans[3][0] < long_job_end


def _fail_on_four_classes(bgr: np.ndarray, probs: np.ndarray) -> np.ndarray:
    if probs.shape[0] == 4:
        raise RuntimeError("broken CRF input")
    return ORIGINAL_CRF(bgr, probs)


def _crf_workers_alive() -> list:
    return [p for p in mp.active_children() if p.name == "crf-worker"]


def test_worker_exception_is_raised_and_pool_stopped(monkeypatch):
    monkeypatch.setattr(crf_module, "crf_from_probs", _fail_on_four_classes)
    pairs = [make_inputs(0), make_inputs(1, c=4)]
    pool = CRFPool(workers=2)
    with pytest.raises(RuntimeError, match="broken CRF input") as raised:
        pool.run([p[0] for p in pairs], [p[1] for p in pairs], timeout_s=60.0)
    assert "_fail_on_four_classes" in str(raised.value.__cause__)  # the worker's traceback comes along
    assert pool._workers == [] and _crf_workers_alive() == []  # every worker stopped, nothing left running


def _hang_ignoring_sigterm_on_four_classes(bgr: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """A stuck worker that also ignores SIGTERM, as one forked inside a training loop's StopSignal block does."""
    if probs.shape[0] == 4:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(600)
    return ORIGINAL_CRF(bgr, probs)


def test_a_stuck_worker_that_ignores_sigterm_is_still_stopped(monkeypatch):
    # Regression: the pool was built on multiprocessing.Pool, whose terminate() sends SIGTERM and joins, so a
    # worker that ignored SIGTERM hung the evaluation (a CI run waited 90 minutes here).
    monkeypatch.setattr(crf_module, "crf_from_probs", _hang_ignoring_sigterm_on_four_classes)
    pairs = [make_inputs(0), make_inputs(1, c=4), make_inputs(2)]
    with CRFPool(workers=2) as pool:
        with pytest.warns(RuntimeWarning, match=r"timed out after 1.0 s on image\(s\) \[1\]"):
            out = pool.run([p[0] for p in pairs], [p[1] for p in pairs], timeout_s=1.0)
        assert out[1] is None and np.array_equal(out[2], ORIGINAL_CRF(*crf_module._prepare(*pairs[2])))
        monkeypatch.setattr(crf_module, "crf_from_probs", _fail_on_four_classes)
        pool.close()  # the next workers are forked afresh and run the new function
        with pytest.raises(RuntimeError, match="broken CRF input"):
            pool.run([pairs[1][0]], [pairs[1][1]], timeout_s=60.0)
    assert _crf_workers_alive() == []


def _die_on_four_classes(bgr: np.ndarray, probs: np.ndarray) -> np.ndarray:
    if probs.shape[0] == 4:
        os._exit(3)  # as a segfault in pydensecrf or the OOM killer would end it: no reply, no exception
    return ORIGINAL_CRF(bgr, probs)


def test_a_worker_that_dies_costs_only_its_image(monkeypatch):
    monkeypatch.setattr(crf_module, "crf_from_probs", _die_on_four_classes)
    pairs = [make_inputs(0), make_inputs(1, c=4), make_inputs(2), make_inputs(3)]
    with CRFPool(workers=2) as pool:
        with pytest.warns(RuntimeWarning, match=r"worker died on image\(s\) \[1\]"):
            out = pool.run([p[0] for p in pairs], [p[1] for p in pairs], timeout_s=60.0)
        assert out[1] is None
        for i in (0, 2, 3):
            assert np.array_equal(out[i], ORIGINAL_CRF(*crf_module._prepare(*pairs[i])))
        assert len(pool._workers) <= 2


def test_bad_shapes_are_clear_errors():
    image, logits = make_inputs(0)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        dense_crf(image[:2], logits)
    with pytest.raises(ValueError, match="one per image"):
        batched_dense_crf([image], [logits, logits])


def _never_reads(*args) -> None:
    """A worker stuck from the moment it was forked (a lock another thread of the parent held at fork time)."""
    time.sleep(600)


def test_a_large_job_for_a_worker_that_never_reads_costs_its_deadline_not_a_hang(monkeypatch):
    monkeypatch.setattr(worker_pool, "_worker_loop", _never_reads)
    pairs = [make_inputs(s, h=200, w=200, c=27) for s in range(2)]  # ~4 MB per job: far more than a pipe holds
    began = time.monotonic()
    with CRFPool(workers=2) as pool, pytest.warns(RuntimeWarning, match=r"image\(s\) \[0, 1\]"):
        out = pool.run([p[0] for p in pairs], [p[1] for p in pairs], timeout_s=1.0)
    assert out == [None, None] and time.monotonic() - began < 30
    assert _crf_workers_alive() == []
