"""STEGO training step: cached backbone features vs recomputing the backbone every step.

    python -m benchmarks.stego_step      (also run by `python -m benchmarks.run_all`)

Both paths run the same head, correspondence loss and probe updates on a batch of 16 images and their 16 kNN
partners (dinov2_vits14 with random weights, 224 px, 2 CPU threads) on the benchmarks' device (`bench_device()`).
The cached path reads float16 features from a memory-mapped file like the feature cache's and copies them to the
device, as `stego.train.load_batch` does; the uncached path runs the frozen backbone on the 32 images.
The default step scores the linear probe on every 4th label pixel (`linear_label_stride=4`); a third row times
the original all-pixel probe loss.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.timing import bench_device, device_label, interleaved_medians
from shared.backbone import build_backbone
from stego.config import StegoConfig
from stego.steps import IndexStream, apply_gradients, build_modules, build_optimizers, knn_partners, step_losses

BATCH, RESOLUTION, THREADS, N_IMAGES, N_CLASSES = 16, 224, 2, 64, 27


def _make_step(cfg, modules, optimizers, batch_fn, device: torch.device):
    stream, rng = IndexStream(N_IMAGES, cfg.batch_size), np.random.default_rng(0)
    knn = np.stack([np.roll(np.arange(N_IMAGES), -i)[:8] for i in range(N_IMAGES)])  # self first
    labels = torch.randint(0, N_CLASSES, (BATCH, RESOLUTION, RESOLUTION)).to(device)
    counter = {"step": 0}

    def step() -> None:
        indices = stream.batch(counter["step"])
        partners = knn_partners(knn, indices, cfg.knn_top, rng)
        feats, feats_knn = batch_fn(indices), batch_fn(partners)
        total, _ = step_losses(modules.train(), modules["head"], feats, feats_knn, labels, cfg)
        apply_gradients(total, modules, optimizers)
        counter["step"] += 1

    return step


def run(repeats: int = 5) -> dict:
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        torch.manual_seed(0)
        device = bench_device()
        backbone = build_backbone("dinov2_vits14", "none", device=device)
        cfg = StegoConfig(batch_size=BATCH)
        modules = build_modules(cfg, backbone.feature_dim, N_CLASSES).to(device)
        optimizers = build_optimizers(cfg, modules)  # after the move, as stego.train does
        images = torch.randn(N_IMAGES, 3, RESOLUTION, RESOLUTION).to(device)
        with tempfile.TemporaryDirectory() as tmp:
            grid = RESOLUTION // backbone.patch_size
            shape = (N_IMAGES, backbone.feature_dim, grid, grid)
            cache = np.memmap(Path(tmp) / "features.f16", dtype=np.float16, mode="w+", shape=shape)
            cache[:] = backbone(images[:8]).cpu().numpy().astype(np.float16).repeat(N_IMAGES // 8, axis=0)
            cache.flush()

            def cached(indices):
                return torch.from_numpy(np.asarray(cache[np.sort(indices)], dtype=np.float32)).to(device)

            def uncached(indices):
                return backbone(images[torch.from_numpy(indices).to(device)])

            full_labels = dataclasses.replace(cfg, linear_label_stride=1)  # the original probe resolution
            times = interleaved_medians({
                "cached": _make_step(cfg, modules, optimizers, cached, device),
                "uncached": _make_step(cfg, modules, optimizers, uncached, device),
                "full": _make_step(full_labels, modules, optimizers, cached, device),
            }, repeats, device=device)
            t_cached, t_uncached, t_full = times["cached"], times["uncached"], times["full"]
    finally:
        torch.set_num_threads(previous_threads)
    notes = [f"on {device_label(device)}: batch {BATCH} + {BATCH} kNN partners, {RESOLUTION} px, {THREADS} CPU "
             f"threads, random weights; backbone bf16 autocast: {backbone.use_bf16}",
             f"1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: when other processes keep the "
             "cores busy, the cached step (many small ops, each a thread barrier) slows far more than the "
             "backbone (few large matmuls), and the ratio drops (measured 3x-17x on a shared 2-core machine)"]
    return {
        "title": f"STEGO training step, dinov2_vits14, {RESOLUTION}x{RESOLUTION}, batch {BATCH}",
        "rows": [
            {"name": "cached features", "value": 1.0 / t_cached, "unit": "steps/s", "reference": "uncached (backbone)",
             "ratio": t_uncached / t_cached},
            {"name": "uncached (backbone)", "value": 1.0 / t_uncached, "unit": "steps/s"},
            {"name": "cached, probe on all label pixels", "value": 1.0 / t_full, "unit": "steps/s",
             "reference": "uncached (backbone)", "ratio": t_uncached / t_full},
            {"name": "cached step time", "value": t_cached * 1000, "unit": "ms"},
            {"name": "uncached step time", "value": t_uncached * 1000, "unit": "ms"},
        ],
        "notes": notes,
    }


if __name__ == "__main__":
    result = run()
    for row in result["rows"]:
        ratio = f"  ({row['ratio']:.1f}x)" if "ratio" in row else ""
        print(f"{row['name']:>22}: {row['value']:.3f} {row['unit']}{ratio}")
    print(*result["notes"], sep="\n")
