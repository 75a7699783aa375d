"""Dense CRF post-processing with the original STEGO / PriMaPs parameters, and a process pool that cannot hang.

Per image: unnormalise to uint8 RGB, reverse to BGR, bilinearly upsample the logits to the image size, softmax,
``unary_from_softmax`` (clip 1e-5), ``DenseCRF2D(W, H, C)``, ``addPairwiseGaussian(sxy=1, compat=3)``,
``addPairwiseBilateral(sxy=67, srgb=3, rgbim=BGR, compat=4)``, ``inference(10)``.

The pool (:class:`CRFPool`, on `shared.worker_pool`) gives every image a deadline; an image that misses it is
returned as ``None`` with a warning, and its worker is killed and replaced while the others go on. The original
code's ``multiprocessing.Pool.map`` could wait forever on a dead or stuck worker (and its ``terminate()`` could
hang too: `shared/worker_pool.py` says why).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pydensecrf.densecrf as dcrf
import torch
import torch.nn.functional as F
from pydensecrf.utils import unary_from_softmax

from shared.data.transforms import denormalize_image
from shared.worker_pool import WorkerPool, available_cores

GAUSSIAN_SXY, GAUSSIAN_COMPAT = 1, 3
BILATERAL_SXY, BILATERAL_SRGB, BILATERAL_COMPAT = 67, 3, 4
N_ITERATIONS = 10


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


class CRFPool:
    """Reusable pool of CRF worker processes with a per-image deadline; use as a context manager.

    ``workers`` defaults to :func:`available_cores`. Worker processes start on first use and are kept until
    :meth:`close`, so an evaluation pays the start-up cost once. An image not done ``timeout_s`` after it was handed
    to a worker comes back as ``None``: its worker is killed and replaced, the other workers go on. A worker that
    dies (a crash in pydensecrf, out of memory) is treated the same way. (`shared.worker_pool` says why this is not
    ``multiprocessing.Pool``.)
    """

    def __init__(self, workers: int | None = None, start_method: str | None = None) -> None:
        # By name: every worker looks crf_from_probs up in this module when it runs a job.
        self._pool = WorkerPool((__name__, "crf_from_probs"), workers, start_method=start_method, name="crf-worker")
        self.workers = self._pool.workers

    @property
    def _workers(self) -> list:
        return self._pool._workers

    def __enter__(self) -> CRFPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (they are idle between calls, so killing them loses nothing)."""
        self._pool.close()

    def run(
        self, images: Sequence[torch.Tensor], logits: Sequence[torch.Tensor], timeout_s: float = 60.0
    ) -> list[np.ndarray | None]:
        """CRF every (image, logits) pair; an image whose result has not arrived ``timeout_s`` after it was handed
        to a worker comes back as ``None`` (with a warning). A worker's exception is re-raised here after every
        worker is stopped."""
        results: list[np.ndarray | None] = [None] * len(images)

        def keep(i: int, result: np.ndarray) -> None:
            results[i] = result

        outcome = self._pool.run(len(images), lambda i: _prepare(images[i], logits[i]), keep, timeout_s=timeout_s)
        if outcome.late:
            warnings.warn(f"Dense CRF timed out after {timeout_s} s on image(s) {sorted(outcome.late)}; returning "
                          "None for them.", RuntimeWarning, stacklevel=2)
        if outcome.died:
            warnings.warn(f"A dense CRF worker died on image(s) {sorted(outcome.died)} (a crash in pydensecrf, or out "
                          "of memory?); returning None for them. Run with one worker to see the error.",
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
