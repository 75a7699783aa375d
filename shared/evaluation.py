"""Evaluate a segmentation head on cached backbone features: unsupervised (Hungarian) and linear-probe scores,
optionally after a dense CRF.

Flip averaging: the head runs on the features of the image and of its horizontal flip; the flipped view's
outputs are flipped back along the width and the two views' *logits* are averaged (cluster and linear logits
separately). ``head_fn`` is opaque (features -> outputs), so the probes cannot be re-applied to an averaged
code; averaging logits is the closest equivalent (for the cosine cluster probe it averages the per-view
similarities rather than taking the similarity of the averaged code; both are flip-equivariant).

In DDP every rank evaluates a strided shard of the images and the confusion histograms are summed across ranks
before matching, so all ranks get the same scores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from shared import dist as sdist
from shared.crf import CRFPool
from shared.metrics import ConfusionAccumulator

HeadFn = Callable[[torch.Tensor], dict]
RESULT_KEYS = ("unsupervised", "linear", "crf_unsupervised", "crf_linear", "smoothed")
# Which logits each score is computed from ("smoothed": a method's own post-processing, beside the CRF).
SOURCES = {"unsupervised": "cluster_logits", "linear": "linear_logits", "smoothed": "smoothed_logits"}


def _shard(n: int) -> np.ndarray:
    return np.arange(sdist.get_rank(), n, sdist.get_world_size())


def _device_of(head_fn: HeadFn) -> torch.device:
    if isinstance(head_fn, torch.nn.Module):
        for t in list(head_fn.parameters()) + list(head_fn.buffers()):
            return t.device
    return torch.device("cpu")


def flip_averaged_logits(head_fn: HeadFn, x: torch.Tensor, x_flipped: torch.Tensor | None) -> dict:
    """Run the head on features (B, C, h, w) (and on the flipped view's features); return
    {"cluster_logits": (B, K', h, w), "linear_logits": (B, K, h, w) or None, "smoothed_logits": (B, K', h, w) or
    None, "variance": (B, h, w) or None} averaged over the two views."""
    out = head_fn(x)
    logits = {key: out.get(key) for key in ("cluster_logits", "linear_logits", "smoothed_logits", "variance")}
    if x_flipped is None:
        return logits
    out_f = head_fn(x_flipped)
    for key, value in logits.items():
        other = out_f.get(key)
        if value is not None and other is not None:
            logits[key] = (value + torch.flip(other, dims=[-1])) / 2
    return logits


def _batch(cached: Any, idx: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(cached.features[idx], dtype=np.float32)).to(device)


def _crf_predictions(pool: CRFPool, images: list[torch.Tensor], logits: torch.Tensor,
                     fallback: torch.Tensor, timeout_s: float) -> tuple[torch.Tensor, int]:
    """CRF argmax (B, H, W) at label size; an image whose CRF timed out keeps its plain prediction."""
    probs = pool.run(images, list(logits.float().cpu()), timeout_s=timeout_s)
    preds, timeouts = fallback.clone(), 0
    for b, p in enumerate(probs):
        if p is None:
            timeouts += 1
            continue
        p = torch.from_numpy(p)
        if p.shape[-2:] != fallback.shape[-2:]:  # images and labels at different sizes
            p = F.interpolate(p[None], size=fallback.shape[-2:], mode="bilinear", align_corners=False)[0]
        preds[b] = p.argmax(0)
    return preds, timeouts


def _check_finite(logits: dict) -> None:
    for key, value in logits.items():
        if value is not None and not torch.isfinite(value).all():
            raise FloatingPointError(f"the head's {key!r} output holds NaN or Inf; the features or the head's "
                                     "weights are not finite, so this segmenter cannot be scored.")


def _check_inputs(features: Any, flipped: Any, crf_images: Any, n_classes: int, n_clusters: int) -> None:
    if features.labels is None:
        raise ValueError(f"Cached features {getattr(features, 'key', '')!r} have no labels; evaluation needs a "
                         "labelled split.")
    n = len(features.features)
    if flipped is not None and len(flipped.features) != n:
        raise ValueError(f"Flipped features hold {len(flipped.features)} images but the features hold {n}; "
                         "use the flip cache of the same split.")
    if crf_images is not None and len(crf_images) != n:
        raise ValueError(f"crf_images holds {len(crf_images)} images but the features hold {n}; pass the same split.")
    if n_clusters < 1 or n_classes < 1:
        raise ValueError(f"n_clusters ({n_clusters}) and n_classes ({n_classes}) must be positive.")


def evaluate_head(head_fn: HeadFn, features: Any, *, flipped: Any | None, n_classes: int, n_clusters: int,
                  extra_policy: str = "error", batch_size: int = 16, crf_images: Any | None = None,
                  crf_workers: int | None = None, crf_timeout_s: float = 60.0, device: str | None = None,
                  progress: Callable[[Iterable], Iterable] | None = None, keep: Iterable[int] = (),
                  crf_linear: bool = True) -> dict:
    """Scores of ``head_fn`` on cached features.

    Args:
        head_fn: features (B, C, h, w) float32 -> {"cluster_logits": (B, n_clusters, h, w),
            "linear_logits": (B, n_classes, h, w) or None, ...} (e.g. a :class:`shared.segmenter.Segmenter`).
            An ``nn.Module`` is put in eval mode for the call; a plain function (a closure over a trainer's
            modules) cannot be, so the caller must switch those modules to eval mode first (dropout!).
        features / flipped: CachedFeatures-like (``.features`` (N, C, h, w), ``.labels`` (N, R, R) or None).
        crf_images: dataset whose items are dicts with "image" (3, R', R'); enables the CRF scores.
        device: where features go; default: the device of ``head_fn``'s parameters (cpu for plain functions).
        progress: optional wrapper around the batch iterator (e.g. ``RunLogger.progress``).
        crf_linear: also refine the linear logits with the CRF (the comparison's table has no such column, and the
            CRF is the dearest part of scoring, so `compare` turns it off).
        keep: image indices whose scored (flip-averaged, upsampled) cluster argmax and variance to return, for
            figures; only those in this rank's shard are returned.
    Returns:
        {"unsupervised", "linear", "crf_unsupervised", "crf_linear", "smoothed": score dicts (see
        :func:`shared.metrics.scores_from_histogram`) or None ("smoothed" scores a ``smoothed_logits`` output);
        "crf": alias of "crf_unsupervised"; "histograms": {name: np.int64 (n_pred, n_classes)}; "extra_policy";
        "n_images"; "crf_timeouts"; "kept": {index: {"prediction": (R, R) int64 cluster ids,
        "variance": (R, R) float32 or None}}}.
    Raises FloatingPointError when an output holds NaN or Inf.
    """
    _check_inputs(features, flipped, crf_images, n_classes, n_clusters)
    dev = torch.device(device) if device is not None else _device_of(head_fn)
    accs = {"unsupervised": ConfusionAccumulator(n_clusters, n_classes),
            "linear": ConfusionAccumulator(n_classes, n_classes),
            "crf_unsupervised": ConfusionAccumulator(n_clusters, n_classes),
            "crf_linear": ConfusionAccumulator(n_classes, n_classes),
            "smoothed": ConfusionAccumulator(n_clusters, n_classes)}
    flags = torch.zeros(3, dtype=torch.int64)  # images with linear logits, CRF timeouts, images with smoothed logits
    keep, kept = {int(i) for i in keep}, {}
    indices = _shard(len(features.features))
    batches = [indices[s:s + batch_size] for s in range(0, len(indices), batch_size)]
    pool = CRFPool(crf_workers) if crf_images is not None else None
    was_training = isinstance(head_fn, torch.nn.Module) and head_fn.training
    if was_training:
        head_fn.eval()
    try:
        with torch.no_grad():
            for idx in progress(batches) if progress is not None else batches:
                x_flip = _batch(flipped, idx, dev) if flipped is not None else None
                logits = flip_averaged_logits(head_fn, _batch(features, idx, dev), x_flip)
                _check_finite(logits)
                labels = torch.from_numpy(np.asarray(features.labels[idx], dtype=np.int64))
                # read once per batch: both the cluster and the linear logits are refined on these images
                images = [crf_images[int(i)]["image"] for i in idx] if pool is not None else None
                if logits["cluster_logits"].shape[1] != n_clusters:
                    raise ValueError(f"head_fn returned {logits['cluster_logits'].shape[1]} cluster logits but "
                                     f"n_clusters={n_clusters}; pass the number of clusters including extras.")
                for name, source in SOURCES.items():
                    lg = logits[source]
                    if lg is None:
                        continue
                    up = F.interpolate(lg.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
                    pred = up.argmax(1).cpu()
                    accs[name].update(pred, labels)
                    if name == "unsupervised":
                        _keep(kept, keep, idx, pred, logits["variance"], labels.shape[-2:])
                    if name != "unsupervised":
                        flags[0 if name == "linear" else 2] += len(idx)
                    if pool is not None and (name == "unsupervised" or (name == "linear" and crf_linear)):
                        crf_pred, timeouts = _crf_predictions(pool, images, lg, pred, crf_timeout_s)
                        accs[f"crf_{name}"].update(crf_pred, labels)
                        flags[1] += timeouts
    finally:
        if pool is not None:
            pool.close()
        if was_training:
            head_fn.train()
    for acc in accs.values():
        acc.all_reduce()
    sdist.all_reduce_sum(flags)
    out = _results(accs, flags, extra_policy, len(features.features), crf_images is not None, crf_linear)
    out["kept"] = kept
    return out


def _keep(kept: dict, keep: set[int], idx: np.ndarray, pred: torch.Tensor, variance: torch.Tensor | None,
          size: tuple[int, int]) -> None:
    """Store the scored prediction (and the upsampled variance) of the images in `keep`."""
    for b, i in enumerate(idx):
        if int(i) not in keep:
            continue
        var = None
        if variance is not None:
            var = F.interpolate(variance[b:b + 1, None].float(), size=size, mode="bilinear", align_corners=False)
            var = var[0, 0].cpu().numpy()
        kept[int(i)] = {"prediction": pred[b].numpy().astype(np.int64), "variance": var}


def _results(accs: dict, flags: torch.Tensor, extra_policy: str, n_images: int, with_crf: bool,
             crf_linear: bool) -> dict:
    has_linear = int(flags[0]) > 0
    enabled = {"unsupervised": True, "linear": has_linear, "crf_unsupervised": with_crf,
               "crf_linear": with_crf and has_linear and crf_linear, "smoothed": int(flags[2]) > 0}
    out: dict = {}
    for name in RESULT_KEYS:
        matching = "identity" if name.endswith("linear") else "hungarian"
        out[name] = accs[name].compute(matching=matching, extra_policy=extra_policy) if enabled[name] else None
    out["crf"] = out["crf_unsupervised"]
    out["histograms"] = {name: accs[name].histogram.cpu().numpy() for name in RESULT_KEYS if enabled[name]}
    out["extra_policy"] = extra_policy
    out["n_images"] = n_images
    out["crf_timeouts"] = int(flags[1])
    return out


def score_segmenter(segmenter: Any, features: Any, *, flipped: Any | None, n_classes: int, extra_policy: str,
                    batch_size: int = 16, crf_images: Any | None = None, device: str | None = None,
                    keep: Iterable[int] = (), progress: Callable[[Iterable], Iterable] | None = None,
                    crf_linear: bool = True) -> dict:
    """Score a loaded exported segmenter: the one code path behind a trainer's final numbers and `compare`'s.

    The number of clusters comes from the segmenter's metadata; see :func:`evaluate_head` for the rest.
    """
    return evaluate_head(segmenter, features, flipped=flipped, n_classes=n_classes,
                         n_clusters=int(segmenter.metadata["n_clusters"]), extra_policy=extra_policy,
                         batch_size=batch_size, crf_images=crf_images, device=device, keep=keep, progress=progress,
                         crf_linear=crf_linear)


def score_summary(scores: dict) -> dict:
    """Flat {"<score>/acc": value, "<score>/miou": value} of the scores present in an evaluate_head result."""
    out = {}
    for name in RESULT_KEYS:
        if scores.get(name):
            out[f"{name}/acc"], out[f"{name}/miou"] = scores[name]["acc"], scores[name]["miou"]
    return out
