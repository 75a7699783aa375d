"""Dense CRF post-processing with the original STEGO / PriMaPs parameters, and a process pool that cannot hang.

Per image: unnormalise to uint8 RGB, reverse to BGR, bilinearly upsample the logits to the image size, softmax,
``unary_from_softmax`` (clip 1e-5), ``DenseCRF2D(W, H, C)``, ``addPairwiseGaussian(sxy=1, compat=3)``,
``addPairwiseBilateral(sxy=67, srgb=3, rgbim=BGR, compat=4)``, ``inference(10)``.

The pool (:class:`CRFPool`) gives every image a deadline; an image that misses it is returned as ``None``
with a warning, and its worker is killed and replaced while the others go on. The original code's
``multiprocessing.Pool.map`` could wait forever on a dead or stuck worker, and so could ``Pool.terminate()``: it
sends SIGTERM, which a stuck worker may ignore, and it takes queue locks that every worker shares, so one worker
that deadlocked after the fork (a lock held by another thread of the parent at fork time) can block it. Our
workers have a pipe each, jobs are handed over without blocking, and workers are stopped with SIGKILL.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
import time
import traceback
import warnings
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import wait

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


def _worker_loop(conn, parent_pid: int) -> None:
    """A CRF worker: receive (bgr, probs), send back ("ok", result) or ("error", exception, traceback text)."""
    # The parent stops workers with SIGKILL, so whatever handlers this process inherited cannot keep it alive.
    while True:
        try:
            while not conn.poll(1.0):
                if os.getppid() != parent_pid:  # the parent was killed: later workers hold copies of our pipe's
                    return  # other end, so no end-of-file would ever arrive
            job = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if job is None:
            return
        try:
            # Looked up at call time, so a forked worker runs what the parent's module holds (tests replace it).
            reply = ("ok", sys.modules[__name__].crf_from_probs(*job))
        except Exception as error:  # noqa: BLE001 - sent to the parent, which raises it
            reply = ("error", error, traceback.format_exc())
        try:
            conn.send(reply)
        except Exception:  # noqa: BLE001 - an exception that does not pickle still reaches the parent as text
            conn.send(("error", RuntimeError(repr(reply[1])), reply[-1]))


class _CRFWorkerError(Exception):
    """The traceback of an exception raised in a CRF worker process (attached as ``__cause__``)."""


class _Worker:
    """One worker process with its own pipe: no lock is shared, so no dead or stuck worker can block another."""

    def __init__(self, ctx) -> None:
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_worker_loop, args=(child_conn, os.getpid()), daemon=True,
                                   name="crf-worker")
        self.process.start()
        child_conn.close()
        self.job: tuple[int, float] | None = None  # (image index, deadline) while busy
        self._sender: threading.Thread | None = None

    def send(self, job: tuple[np.ndarray, np.ndarray]) -> None:
        """Hand over a job without blocking: a large job fills the pipe and waits for the worker to read it, and a
        worker that never reads (stuck since it was forked) must cost its deadline, not a hang here."""
        self._sender = threading.Thread(target=self._send, args=(job,), daemon=True, name="crf-send")
        self._sender.start()

    def _send(self, job: tuple[np.ndarray, np.ndarray]) -> None:
        try:
            self.conn.send(job)
        except (OSError, ValueError):  # the worker was killed (its deadline passed) while the job was on its way
            pass

    def kill(self) -> None:
        # SIGKILL, not SIGTERM: a worker stuck in C code, or one that inherited a SIGTERM handler from a training
        # loop, ignores SIGTERM, and waiting for it would hang the caller.
        self.process.kill()
        self.process.join()
        if self._sender is not None:  # its send fails at once now that the worker is gone; let it end before the
            self._sender.join(timeout=5.0)  # pipe is closed under it
        self.conn.close()


class CRFPool:
    """Reusable pool of CRF worker processes with a per-image deadline; use as a context manager.

    ``workers`` defaults to :func:`available_cores`. Worker processes start on first use and are kept until
    :meth:`close`, so an evaluation pays the start-up cost once. An image not done ``timeout_s`` after it was handed
    to a worker comes back as ``None``: its worker is killed and replaced, the other workers go on. A worker that
    dies (a crash in pydensecrf, out of memory) is treated the same way.
    """

    def __init__(self, workers: int | None = None, start_method: str | None = None) -> None:
        self.workers = max(1, workers or available_cores())
        self._ctx = mp.get_context(start_method or _default_start_method())
        self._workers: list[_Worker] = []

    def __enter__(self) -> CRFPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (they are idle between calls, so killing them loses nothing)."""
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.kill()

    def _idle_worker(self) -> _Worker | None:
        for worker in self._workers:
            if worker.job is None:
                return worker
        if len(self._workers) < self.workers:
            self._workers.append(_Worker(self._ctx))
            return self._workers[-1]
        return None

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers.remove(worker)

    def run(
        self, images: Sequence[torch.Tensor], logits: Sequence[torch.Tensor], timeout_s: float = 60.0
    ) -> list[np.ndarray | None]:
        """CRF every (image, logits) pair; an image whose result has not arrived ``timeout_s`` after it was handed
        to a worker comes back as ``None`` (with a warning). A worker's exception is re-raised here after every
        worker is stopped."""
        n = len(images)
        results: list[np.ndarray | None] = [None] * n
        pending, late, died = deque(range(n)), [], []
        try:
            while True:
                while pending and (worker := self._idle_worker()) is not None:
                    i = pending.popleft()
                    job = _prepare(images[i], logits[i])
                    worker.send(job)
                    worker.job = (i, time.monotonic() + timeout_s)  # the deadline starts when the worker has it
                busy = [w for w in self._workers if w.job is not None]
                if not busy:
                    break
                nearest = min(w.job[1] for w in busy)
                ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy],
                             timeout=max(0.0, nearest - time.monotonic()))
                now = time.monotonic()
                for worker in busy:
                    i, deadline = worker.job
                    if worker.conn in ready or worker.conn.poll():
                        try:
                            reply = worker.conn.recv()
                        except (EOFError, OSError):  # died while sending
                            died.append(i)
                            self._replace(worker)
                            continue
                        worker.job = None
                        if reply[0] == "error":
                            raise reply[1] from _CRFWorkerError(reply[2])
                        if now <= deadline:
                            results[i] = reply[1]
                        else:
                            late.append(i)
                    elif worker.process.sentinel in ready:
                        died.append(i)
                        self._replace(worker)
                    elif deadline <= now:
                        late.append(i)
                        self._replace(worker)  # the only way to free a stuck worker
        except BaseException:
            self.close()
            raise
        if late:
            warnings.warn(f"Dense CRF timed out after {timeout_s} s on image(s) {sorted(late)}; returning None for "
                          "them.", RuntimeWarning, stacklevel=2)
        if died:
            warnings.warn(f"A dense CRF worker died on image(s) {sorted(died)} (a crash in pydensecrf, or out of "
                          "memory?); returning None for them. Run with one worker to see the error.",
                          RuntimeWarning, stacklevel=2)
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
