"""Dense CRF post-processing with the original STEGO / PriMaPs parameters, and a process pool that cannot hang.

Per image: unnormalise to uint8 RGB, reverse to BGR, bilinearly upsample the logits to the image size, softmax,
``unary_from_softmax`` (clip 1e-5), ``DenseCRF2D(W, H, C)``, ``addPairwiseGaussian(sxy=1, compat=3)``,
``addPairwiseBilateral(sxy=67, srgb=3, rgbim=BGR, compat=4)``, ``inference(10)``.

The pool (:class:`CRFPool`) gives every image a deadline; an image that misses it is returned as ``None``
with a warning, the stuck worker processes are terminated, and the other images are resubmitted to fresh
workers. The original code's ``multiprocessing.Pool.map`` could wait forever on a dead or stuck worker.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Sequence

import numpy as np
import pydensecrf.densecrf as dcrf
import torch
import torch.nn.functional as F
from pydensecrf.utils import unary_from_softmax

from shared.data.transforms import denormalize_image

GAUSSIAN_SXY, GAUSSIAN_COMPAT = 1, 3
BILATERAL_SXY, BILATERAL_SRGB, BILATERAL_COMPAT = 67, 3, 4
N_ITERATIONS = 10


def available_cores() -> int:
    """CPU cores this process may run on (respects taskset / cgroups affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return os.cpu_count() or 1


def image_to_bgr_uint8(image: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised (3, H, W) tensor -> contiguous uint8 BGR (H, W, 3).

    Rounds to the nearest grey level, so a uint8 image survives normalise -> unnormalise exactly. (The
    originals truncated via ``to_pil_image``, which loses one grey level on about 30% of the channel values of the
    bundled sample: see benchmarks/stego_deviations.py.)
    """
    return np.ascontiguousarray(denormalize_image(image)[:, :, ::-1])


def _softmax_at_size(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """logits (C, h, w) -> float32 probabilities (C, H, W) after bilinear upsampling (align_corners=False)."""
    up = F.interpolate(logits.detach().float().cpu()[None], size=size, mode="bilinear", align_corners=False)[0]
    return F.softmax(up, dim=0).numpy()


def crf_from_probs(bgr: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """The CRF itself (numpy only, runs in pool workers): bgr (H, W, 3) uint8, probs (C, H, W) -> (C, H, W)."""
    n_classes, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, n_classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs, clip=1e-5)))
    crf.addPairwiseGaussian(sxy=GAUSSIAN_SXY, compat=GAUSSIAN_COMPAT)
    crf.addPairwiseBilateral(sxy=BILATERAL_SXY, srgb=BILATERAL_SRGB, rgbim=bgr, compat=BILATERAL_COMPAT)
    q = crf.inference(N_ITERATIONS)
    return np.asarray(q, dtype=np.float32).reshape(n_classes, height, width)


def _prepare(image: torch.Tensor, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"CRF image must be (3, H, W), got {tuple(image.shape)}.")
    if logits.dim() != 3:
        raise ValueError(f"CRF logits must be (C, h, w), got {tuple(logits.shape)}.")
    bgr = image_to_bgr_uint8(image)
    return bgr, _softmax_at_size(logits, bgr.shape[:2])


def dense_crf(image: torch.Tensor, logits: torch.Tensor) -> np.ndarray:
    """Refine ``logits`` (C, h, w) with a dense CRF on ``image`` (3, H, W, ImageNet-normalised).

    Returns float32 probabilities (C, H, W); take the argmax over C for labels.
    """
    return crf_from_probs(*_prepare(image, logits))


def _default_start_method() -> str:
    # fork starts workers in milliseconds and needs no `if __name__ == "__main__"` guard in user scripts; the
    # workers only run numpy and pydensecrf, so the parent's torch / CUDA state is never touched in them.
    return "fork" if sys.platform.startswith("linux") else "spawn"


class CRFPool:
    """Reusable pool of CRF worker processes with a per-image deadline; use as a context manager.

    ``workers`` defaults to :func:`available_cores`. Worker processes start on first use and are kept until
    :meth:`close`, so an evaluation pays the start-up cost once.
    """

    def __init__(self, workers: int | None = None, start_method: str | None = None) -> None:
        self.workers = max(1, workers or available_cores())
        self._ctx = mp.get_context(start_method or _default_start_method())
        self._pool = None

    def __enter__(self) -> CRFPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (they are idle between calls, so terminate loses nothing)."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def _submit(self, job: tuple[np.ndarray, np.ndarray], on_done):
        if self._pool is None:
            self._pool = self._ctx.Pool(self.workers)
        return self._pool.apply_async(crf_from_probs, job, callback=on_done, error_callback=on_done)

    def run(
        self, images: Sequence[torch.Tensor], logits: Sequence[torch.Tensor], timeout_s: float = 60.0
    ) -> list[np.ndarray | None]:
        """CRF every (image, logits) pair; an image not done ``timeout_s`` after it was handed to a worker
        comes back as ``None`` (with a warning). Worker exceptions are re-raised after the pool is stopped."""
        n = len(images)
        results: list[np.ndarray | None] = [None] * n
        pending, inflight = deque(range(n)), {}  # inflight: index -> (AsyncResult, deadline)
        finished_at: dict[int, float] = {}  # written by the pool's result thread
        wake = threading.Event()

        def on_done(i: int):
            return lambda _: (finished_at.__setitem__(i, time.monotonic()), wake.set())

        try:
            while pending or inflight:
                while pending and len(inflight) < self.workers:  # at most one job per worker: deadlines are fair
                    i = pending.popleft()
                    # A resubmitted image may carry its completion record from the terminated pool; a stale
                    # record would make res.get() below wait without a deadline on the fresh worker.
                    finished_at.pop(i, None)
                    inflight[i] = (self._submit(_prepare(images[i], logits[i]), on_done(i)),
                                   time.monotonic() + timeout_s)
                now = time.monotonic()
                late = []
                for i, (res, deadline) in list(inflight.items()):
                    if i in finished_at or res.ready():
                        del inflight[i]
                        value = res.get()  # re-raises a worker exception
                        if finished_at.get(i, now) <= deadline:
                            results[i] = value
                        else:
                            late.append(i)
                    elif deadline <= now:
                        late.append(i)
                if late:
                    warnings.warn(f"Dense CRF timed out after {timeout_s} s on image(s) {sorted(late)}; returning "
                                  "None for them.", RuntimeWarning, stacklevel=2)
                stuck = [i for i in late if i in inflight]
                if stuck:
                    self.close()  # the only way to free a stuck worker; the others are resubmitted
                    pending.extendleft(reversed([i for i in inflight if i not in stuck]))
                    inflight.clear()
                if not inflight or (pending and len(inflight) < self.workers):
                    continue  # a worker is free: hand it the next image before waiting again
                wake.clear()
                # The pool calls `on_done` *before* the result reports ready(), so the callback's record is the
                # signal to trust: waiting on ready() alone sleeps through a finished job and serialises the pool.
                if not any(i in finished_at or res.ready() for i, (res, _) in inflight.items()):
                    wake.wait(max(0.0, min(deadline for _, deadline in inflight.values()) - time.monotonic()))
        except BaseException:
            self.close()
            raise
        return results


def batched_dense_crf(
    images: Sequence[torch.Tensor] | torch.Tensor,
    logits: Sequence[torch.Tensor] | torch.Tensor,
    *,
    workers: int | None = None,
    timeout_s: float = 60.0,
    pool: CRFPool | None = None,
) -> list[np.ndarray | None]:
    """:func:`dense_crf` over a batch: images (B, 3, H, W), logits (B, C, h, w) (tensors or sequences).

    Runs on ``pool`` when given, else on a temporary pool of ``workers`` processes (default: the available
    cores, at most B). ``workers=1`` runs in this process, without a timeout. Returns a list of B float32
    arrays (C, H, W), ``None`` for images that timed out.
    """
    if len(images) != len(logits):
        raise ValueError(f"Got {len(images)} images but {len(logits)} logit maps; pass one per image.")
    if pool is not None:
        return pool.run(images, logits, timeout_s=timeout_s)
    n_workers = min(workers or available_cores(), max(1, len(images)))
    if n_workers == 1:
        return [dense_crf(img, lg) for img, lg in zip(images, logits, strict=True)]
    with CRFPool(n_workers) as tmp:
        return tmp.run(images, logits, timeout_s=timeout_s)
