"""Feature-cache build rate (1 process vs 2 sharded processes), publish overhead and cache-hit load time on the
bundled CamVid sample (dinov2_vits14, random weights), plus the ViT-B/14 : ViT-S/14 FLOP ratio for estimates.

    python -c "from benchmarks.feature_cache import run; print(run())"

The 1-process build and the cache hit run on the benchmarks' device (`bench_device()`). The 2-process build forks
two ranks joined in a gloo group (as torchrun would start them, minus the start-up), each with half the threads of
the 1-process build, so both use the same cores; it always runs on the CPU (a forked child cannot use CUDA), and
only on the CPU is it compared with the 1-process build.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.timing import bench_device, device_label, synchronize
from dinov2_patched import create_model
from shared.backbone import build_backbone
from shared.data import build_dataset
from shared.data.feature_cache import FeatureCache


def vit_flops(name: str, resolution: int = 224) -> float:
    """FLOPs of one image through backbone `name` (all blocks), counted on the meta device (no weights)."""
    model = create_model(name, "meta").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.get_intermediate_layers(torch.empty(1, 3, resolution, resolution, device="meta"),
                                      n=[model.n_blocks - 1], reshape=True, norm=True)
    return float(counter.get_total_flops())


def _build_once(backbone, dataset, batch_size: int) -> float:
    """Seconds for one full build into a fresh cache folder."""
    root = Path(tempfile.mkdtemp(prefix="bench_feature_cache_"))
    try:
        start = time.perf_counter()
        FeatureCache(root).get(backbone, dataset, batch_size=batch_size, progress=False)
        synchronize(backbone.device)  # nothing should be left queued (the rows are copied out), but be sure
        return time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _sharded_rank(rank: int, world: int, threads: int, root: str, backbone, dataset, batch_size: int,
                  repeats: int) -> None:
    """One forked rank: `repeats` sharded builds; rank 0 writes [(seconds, publish_seconds), ...] to root/times."""
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=world)
    try:
        times = []
        for repeat in range(repeats):
            dist.barrier()  # start together, as the ranks of a job do
            start = time.perf_counter()
            cached = FeatureCache(Path(root) / f"cache{repeat}").get(backbone, dataset, batch_size=batch_size,
                                                                     progress=False)
            times.append((time.perf_counter() - start, cached.meta["publish_seconds"]))
        if rank == 0:
            Path(root, "times").write_text(json.dumps(times))
    finally:
        dist.destroy_process_group()
        os._exit(0)


def _sharded_builds(backbone, dataset, batch_size: int, repeats: int, world: int = 2) -> list[tuple[float, float]]:
    """(seconds, publish seconds) of `repeats` builds sharded over `world` forked ranks."""
    threads = max(1, torch.get_num_threads() // world)
    root = tempfile.mkdtemp(prefix="bench_feature_cache_sharded_")
    context = multiprocessing.get_context("fork")  # the ranks inherit the backbone and dataset: no re-import
    try:
        procs = [context.Process(target=_sharded_rank, args=(rank, world, threads, root, backbone, dataset,
                                                             batch_size, repeats)) for rank in range(world)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(600)
        if not Path(root, "times").exists():
            raise RuntimeError(f"the sharded build ranks failed (exit codes {[p.exitcode for p in procs]})")
        return [tuple(t) for t in json.loads(Path(root, "times").read_text())]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _hit_ms(backbone, dataset, batch_size: int, repeats: int) -> tuple[float, tuple]:
    root = Path(tempfile.mkdtemp(prefix="bench_feature_cache_"))
    try:
        cache = FeatureCache(root)
        cache.get(backbone, dataset, batch_size=batch_size, progress=False)
        hit_s = []
        for _ in range(repeats):
            start = time.perf_counter()
            cached = cache.get(backbone, dataset, progress=False)
            float(np.asarray(cached.features, dtype=np.float32).sum())  # touch every page
            hit_s.append(time.perf_counter() - start)
        return 1000 * statistics.median(hit_s), tuple(cached.features.shape)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(repeats: int = 3, *, split: str = "train", batch_size: int = 4) -> dict:
    """Median images/s of 1-process (on `bench_device()`) and 2-process (CPU) builds, publish share, hit time, FLOP
    ratio."""
    device = bench_device()
    backbone = build_backbone("dinov2_vits14", weights="none", device=device)
    cpu_backbone = backbone if device.type == "cpu" else build_backbone("dinov2_vits14", weights="none")
    dataset = build_dataset("camvid_sample", split, resolution=224)
    n, threads = len(dataset), torch.get_num_threads()
    single_s = statistics.median(_build_once(backbone, dataset, batch_size) for _ in range(repeats))
    sharded = _sharded_builds(cpu_backbone, dataset, batch_size, repeats)
    sharded_s = statistics.median(s for s, _ in sharded)
    publish_share = statistics.median(p / s for s, p in sharded)
    hit_ms, shape = _hit_ms(backbone, dataset, batch_size, repeats)
    small, base = vit_flops("dinov2_vits14"), vit_flops("dinov2_vitb14")
    where = f"{threads} threads" if device.type == "cpu" else str(device)
    single = f"cache build, 1 process ({where})"
    sharded_row = {"name": f"cache build, 2 ranks x {max(1, threads // 2)} thread(s), sharded", "value":
                   round(n / sharded_s, 2), "unit": "images/s"}
    if device.type == "cpu":  # a ratio across devices would not say what sharding buys
        sharded_row["reference"] = single
    return {
        "title": f"Feature cache, dinov2_vits14 (random weights), camvid_sample/{split} ({n} images, 224x224)",
        "rows": [
            {"name": single, "value": round(n / single_s, 2), "unit": "images/s"},
            sharded_row,
            {"name": "check + publish of the parts (2 ranks)", "value": round(100 * publish_share, 3),
             "unit": "% of the build"},
            {"name": "cache hit (open + read all features)", "value": round(hit_ms, 2), "unit": "ms"},
            {"name": "GFLOPs per 224 px image, dinov2_vits14", "value": round(small / 1e9, 2), "unit": "GFLOP"},
            {"name": "GFLOPs per 224 px image, dinov2_vitb14", "value": round(base / 1e9, 2), "unit": "GFLOP",
             "reference": "GFLOPs per 224 px image, dinov2_vits14"},
        ],
        "notes": [f"features {shape} float16, bf16 autocast: {backbone.use_bf16}, batch size {batch_size}, "
                  f"median of {repeats} builds each; the 2 ranks are forked and joined by gloo, timed from a "
                  "barrier to the published cache (start-up excluded)",
                  f"1-process build on {device_label(device)}; the 2-rank sharded build on the CPU (gloo, forked "
                  f"ranks; bf16 autocast: {cpu_backbone.use_bf16}); the cache hit reads from disk"],
    }
