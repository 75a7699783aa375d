"""Feature-cache build rate and cache-hit load time on the bundled CamVid sample (dinov2_vits14, random weights).

    python -c "from benchmarks.feature_cache import run; print(run())"
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from shared.backbone import build_backbone
from shared.data import build_dataset
from shared.data.feature_cache import FeatureCache


def _build_once(backbone, dataset, batch_size: int) -> float:
    """Seconds for one full build into a fresh cache folder."""
    root = Path(tempfile.mkdtemp(prefix="bench_feature_cache_"))
    try:
        start = time.perf_counter()
        FeatureCache(root).get(backbone, dataset, batch_size=batch_size, progress=False)
        return time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(repeats: int = 3, *, split: str = "val", batch_size: int = 16) -> dict:
    """Median images/s of a cache build and median milliseconds of a cache hit that reads every feature."""
    backbone = build_backbone("dinov2_vits14", weights="none")
    dataset = build_dataset("camvid_sample", split, resolution=224)
    build_s = statistics.median(_build_once(backbone, dataset, batch_size) for _ in range(repeats))
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
        shape = tuple(cached.features.shape)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n = len(dataset)
    return {
        "title": f"Feature cache, dinov2_vits14 (random weights), camvid_sample/{split} ({n} images, 224x224)",
        "rows": [
            {"name": "cache build", "value": round(n / build_s, 2), "unit": "images/s"},
            {"name": "cache hit (open + read all features)", "value": round(1000 * statistics.median(hit_s), 2),
             "unit": "ms"},
        ],
        "notes": [f"features {shape} float16, bf16 autocast: {backbone.use_bf16}, batch size {batch_size}, "
                  f"median of {repeats} runs"],
    }
