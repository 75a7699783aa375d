"""Dense CRF throughput: the process pool (`shared.crf.CRFPool`) against one process.

    python -m benchmarks.crf [--repeats 3]

Eight 320x320 images with 27-class logits at 40x40 (a ViT-8 grid). The pool is started and warmed once, then
the pool and the single-process loop are timed interleaved, one batch each per round, so a busy shared machine
slows both alike; figures are medians over the rounds. CPU only (pydensecrf on numpy arrays), whatever the
benchmarks' device.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.timing import cpu_only_notes
from shared.crf import CRFPool, available_cores, dense_crf

N_IMAGES, RESOLUTION, N_CLASSES, GRID = 8, 320, 27, 40


def _inputs() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    # smooth random images (upsampled noise) so the bilateral term sees edges, not pure noise
    low = torch.randn(N_IMAGES, 3, 10, 10, generator=gen)
    images = torch.nn.functional.interpolate(low, size=(RESOLUTION, RESOLUTION), mode="bilinear")
    logits = 3 * torch.randn(N_IMAGES, N_CLASSES, GRID, GRID, generator=gen)
    return list(images), list(logits)


def run(repeats: int = 3) -> dict:
    """Images/s of the CRF on a pool of all available cores vs one process (medians over `repeats` rounds)."""
    torch.set_num_threads(1)
    images, logits = _inputs()
    workers = available_cores()
    pool_times, single_times = [], []
    with CRFPool(workers) as pool:
        pool.run(images[:workers], logits[:workers])  # start the workers outside the timing
        for _ in range(repeats):
            start = time.perf_counter()
            out = pool.run(images, logits, timeout_s=600.0)
            pool_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            for img, lg in zip(images, logits, strict=True):
                dense_crf(img, lg)
            single_times.append(time.perf_counter() - start)
    if any(o is None for o in out):
        raise RuntimeError("a CRF image timed out during the benchmark")
    pool_speed = N_IMAGES / statistics.median(pool_times)
    single_speed = N_IMAGES / statistics.median(single_times)
    return {
        "title": f"Dense CRF, {N_IMAGES} images {RESOLUTION}x{RESOLUTION}, {N_CLASSES} classes, 10 iterations",
        "rows": [
            {"name": f"pool ({workers} workers)", "value": pool_speed, "unit": "images/s",
             "reference": "single process", "ratio": pool_speed / single_speed},
            {"name": "single process", "value": single_speed, "unit": "images/s"},
        ],
        "notes": [f"{workers} cores available; median over {repeats} interleaved rounds",
                  *cpu_only_notes("the dense CRF (a process pool of pydensecrf workers)")],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    result = run(parser.parse_args(argv).repeats)
    print(result["title"])
    for row in result["rows"]:
        ratio = f"  ({row['ratio']:.2f}x {row['reference']})" if "ratio" in row else ""
        print(f"  {row['name']:<22} {row['value']:.3g} {row['unit']}{ratio}")


if __name__ == "__main__":
    main()
