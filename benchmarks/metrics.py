"""Confusion-histogram accumulation rate and Hungarian matching time.

    python -m benchmarks.metrics [--repeats 5]

A batch of 16 label maps at 320x320 with 27 classes (+ 3 extra clusters), accumulated with
`ConfusionAccumulator.update` (torch.bincount); then matching and scoring the 30x27 histogram. Medians over
the repeats after one warm-up. CPU only, whatever the benchmarks' device: the evaluation accumulates and matches
on the CPU.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.timing import cpu_only_notes, median_of
from shared.metrics import ConfusionAccumulator

BATCH, RESOLUTION, N_CLASSES, N_EXTRA = 16, 320, 27, 3


def run(repeats: int = 5) -> dict:
    """Pixels/s of histogram accumulation and milliseconds per Hungarian match + scores."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    pred = torch.randint(0, N_CLASSES + N_EXTRA, (BATCH, RESOLUTION, RESOLUTION), generator=gen)
    target = torch.randint(-1, N_CLASSES, (BATCH, RESOLUTION, RESOLUTION), generator=gen)
    acc = ConfusionAccumulator(N_CLASSES + N_EXTRA, N_CLASSES)
    update_s = median_of(lambda: acc.update(pred, target), repeats, device="cpu")
    match_s = median_of(lambda: acc.compute(extra_policy="error"), repeats, device="cpu")
    return {
        "title": f"Confusion histogram, batch {BATCH}x{RESOLUTION}x{RESOLUTION}, {N_CLASSES}+{N_EXTRA} clusters",
        "rows": [
            {"name": "histogram update (bincount)", "value": pred.numel() / update_s, "unit": "pixels/s"},
            {"name": "Hungarian match + scores", "value": 1000 * match_s, "unit": "ms"},
        ],
        "notes": [f"1 thread; median over {repeats} calls after one warm-up",
                  *cpu_only_notes("the confusion histogram and the Hungarian matching (SciPy)")],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    result = run(parser.parse_args(argv).repeats)
    print(result["title"])
    for row in result["rows"]:
        print(f"  {row['name']:<30} {row['value']:.4g} {row['unit']}")


if __name__ == "__main__":
    main()
