"""PriMaPs mask proposals: ours (exact top eigenvector) against the original's per-mask `torch.pca_lowrank(q=3,
niter=100)`, at the spec's resolution (320 px -> 23 x 23 DINOv2 ViT-S/14 grid, 384 channels), one thread; and the
pseudo-mask pool (proposals + CRF) against one process.

    python -m benchmarks.primaps [--repeats 3]

The features are smooth synthetic maps with planted regions (a random-weight backbone gives near-constant
features and almost no masks): 8 regions with their own directions, blended at their borders, plus noise. The
reference takes each mask's direction from `pca_lowrank` and orients it by our sign rule, so both compute the same
algorithm; the IoU of their masks says how exact the fast direction is. CPU only, whatever the benchmarks' device:
the pseudo-masks are computed by a CPU process pool.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from benchmarks.timing import cpu_only_notes
from primaps.masks import COVERAGE, THRESHOLD, principal_mask_proposals
from primaps.pseudo_masks import MaskParams, compute_masks
from shared.crf import available_cores

GRID, DIM, N_IMAGES, RESOLUTION = 23, 384, 6, 322


def synthetic_features(seed: int) -> torch.Tensor:
    """(DIM, GRID, GRID): 8 blob-shaped regions with their own directions, soft borders, noise."""
    gen = torch.Generator().manual_seed(seed)
    field = F.interpolate(torch.randn(1, 8, 4, 4, generator=gen), size=(GRID, GRID), mode="bicubic")[0]
    weights = torch.softmax(4 * field, dim=0)  # (8, h, w)
    protos = torch.randn(8, DIM, generator=gen)
    return torch.einsum("kd,khw->dhw", protos, weights) + 0.3 * torch.randn(DIM, GRID, GRID, generator=gen)


def reference_proposals(features: torch.Tensor) -> torch.Tensor:
    """The original loop with `pca_lowrank(q=3, niter=100)` per mask, its sign fixed by our rule."""
    c, h, w = features.shape
    feat = features.reshape(c, -1)
    normed = F.normalize(feat, dim=0)
    free = torch.ones(h * w, dtype=torch.bool)
    masks, memory = [], []
    while (~free).sum() / free.numel() < COVERAGE:
        _, _, v = torch.pca_lowrank(feat[:, free].T, q=3, niter=100)
        v = v[:, 0] if float(normed[:, free].sum(1) @ v[:, 0]) >= 0 else -v[:, 0]
        sim = torch.where(free, v @ normed, torch.full((), -float("inf")))
        sim = normed[:, sim.argmax()] @ normed
        sim[~free] = 0
        sim[sim < THRESHOLD * sim.max()] = 0
        sim = sim / sim.max()
        masks.append(sim)
        free = free & ~(sim > 0)
        memory.insert(0, free.clone())
        if len(memory) > 3:
            memory.pop()
            if all(torch.equal(memory[0], m) for m in memory):
                break
    return torch.stack(masks).reshape(-1, h, w)


def mask_iou(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over the reference's masks of the IoU with the same-index mask of ours (0 where ours has fewer)."""
    ious = []
    for i, r in enumerate(ref > 0):
        o = ours[i] > 0 if i < len(ours) else torch.zeros_like(r)
        ious.append(float((o & r).sum()) / max(1.0, float((o | r).sum())))
    return statistics.mean(ious)


class _Images:
    name, split, resolution = "synthetic", "bench", RESOLUTION

    def __init__(self) -> None:
        low = torch.randn(N_IMAGES, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        self.images = F.interpolate(low, size=(RESOLUTION, RESOLUTION), mode="bilinear")

    def __len__(self) -> int:
        return N_IMAGES

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "index": i}

    def image_path(self, i: int) -> str:
        return f"synthetic/{i}"


def run(repeats: int = 3) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    blas = threadpool_limits(1)  # the eigensolver's BLAS: one thread as well
    try:
        feats = [synthetic_features(s) for s in range(N_IMAGES)]
        ours_t, ref_t, ious, n_masks = [], [], [], []
        for _ in range(repeats):  # interleaved, so a busy machine slows both alike
            for f in feats:
                start = time.perf_counter()
                ours = principal_mask_proposals(f)
                ours_t.append(time.perf_counter() - start)
                start = time.perf_counter()
                ref = reference_proposals(f)
                ref_t.append(time.perf_counter() - start)
                ious.append(mask_iou(ours, ref))
                n_masks.append(len(ref))
        dataset, params = _Images(), MaskParams()
        arrays = [f.numpy() for f in feats]
        workers = available_cores()
        pool_t, single_t = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            pooled = compute_masks(dataset, arrays.__getitem__, params, workers=workers, progress=False)
            pool_t.append(time.perf_counter() - start)
            start = time.perf_counter()
            single = compute_masks(dataset, arrays.__getitem__, params, workers=1, progress=False)
            single_t.append(time.perf_counter() - start)
        if not (pooled == single).all():
            raise RuntimeError("the pool's pseudo-masks differ from one process's")
    finally:
        torch.set_num_threads(threads)
        blas.restore_original_limits()
    ours_ms, ref_ms = 1e3 * statistics.median(ours_t), 1e3 * statistics.median(ref_t)
    pool_ips, single_ips = N_IMAGES / statistics.median(pool_t), N_IMAGES / statistics.median(single_t)
    return {
        "title": f"PriMaPs mask proposals, {DIM}x{GRID}x{GRID} features ({RESOLUTION} px, ViT-S/14), one thread",
        "rows": [
            {"name": "ours: exact top eigenvector", "value": ours_ms, "unit": "ms/image",
             "reference": "original: pca_lowrank(q=3, niter=100) per mask", "ratio": ref_ms / ours_ms},
            {"name": "original: pca_lowrank(q=3, niter=100) per mask", "value": ref_ms, "unit": "ms/image"},
            {"name": "mask IoU, ours vs original (same signs)", "value": statistics.mean(ious), "unit": "mean IoU"},
            {"name": f"pseudo-masks (proposals + CRF), pool of {workers}", "value": pool_ips, "unit": "images/s",
             "reference": "pseudo-masks, one process", "ratio": pool_ips / single_ips},
            {"name": "pseudo-masks, one process", "value": single_ips, "unit": "images/s"},
        ],
        "notes": [f"{N_IMAGES} synthetic images, {statistics.mean(n_masks):.1f} masks per image; medians over "
                  f"{repeats} interleaved rounds; the speed ratio of the first row is original / ours",
                  *cpu_only_notes("the PriMaPs pseudo-masks (proposals + CRF in a process pool)")],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    result = run(parser.parse_args(argv).repeats)
    print(result["title"])
    for row in result["rows"]:
        ratio = f"  ({row['ratio']:.2f}x)" if "ratio" in row else ""
        print(f"  {row['name']:<50} {row['value']:.4g} {row['unit']}{ratio}")
    for note in result["notes"]:
        print(f"  - {note}")


if __name__ == "__main__":
    main()
