"""PU-SegNet: uncertainty-aware smoothing vs the dense CRF per image, and the head's throughput next to STEGO's.

    python -m benchmarks.pusegnet      (also run by `python -m benchmarks.run_all`)

Smoothing vs CRF: one 320x320 image with 27-class logits on the 23x23 grid of a ViT-S/14 at 322 px; the CRF
(the shared one, 10 mean-field iterations) runs at the image's size, the smoothing (5 iterations, 3x3, 70th
percentile) on the feature grid, as each method does. Head throughput: the exported-head forward (features ->
outputs) of PU-SegNet at the paper's sizes (hidden 256, 1,024 random features, smoothing included) and of
STEGO's (D = 70, cluster and linear probes), batch 16 on the 23x23 grid. One CPU thread: the CRF runs one image
per process, and on a shared machine multi-threaded small ops mostly measure the other processes. The smoothing
and both heads run on the benchmarks' device (`bench_device()`); the CRF always runs on the CPU (pydensecrf on
numpy arrays, a process pool in real use).
"""

from __future__ import annotations

import math
import os

import torch

from benchmarks.timing import bench_device, device_label, median_of
from pusegnet.model import PusegnetEvalHead, PusegnetHead
from pusegnet.smoothing import uncertainty_aware_smoothing
from shared.crf import dense_crf
from shared.probes import ClusterProbe, LinearProbe
from stego.model import StegoEvalHead, StegoHead

RESOLUTION, GRID, N_CLASSES, C, BATCH, THREADS = 320, 23, 27, 384, 16, 1


def _smoothing_vs_crf(repeats: int, device: torch.device) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(1, 3, 10, 10, generator=gen)
    image = torch.nn.functional.interpolate(low, size=(RESOLUTION, RESOLUTION), mode="bilinear")[0]
    logits = 3 * torch.randn(N_CLASSES, GRID, GRID, generator=gen)  # on the CPU: the CRF's input
    features, variance = torch.randn(1, C, GRID, GRID, generator=gen), torch.rand(1, GRID, GRID, generator=gen)
    logits_d, variance_d, features_d = (t.to(device) for t in (logits, variance, features))  # the smoothing's

    def smooth() -> None:
        with torch.no_grad():
            uncertainty_aware_smoothing(torch.softmax(logits_d[None], 1), variance_d, features_d)

    return (median_of(smooth, repeats=5 * repeats, device=device),
            median_of(lambda: dense_crf(image, logits), repeats=repeats, device="cpu"))


def _heads(repeats: int, device: torch.device) -> tuple[float, float]:
    torch.manual_seed(0)
    ours = PusegnetEvalHead(PusegnetHead(C, N_CLASSES), LinearProbe(256, N_CLASSES), mean_field_factor=math.pi / 8,
                            smooth_iterations=5, smooth_percentile=70.0, smooth_window=3, smooth_sigma=0.5,
                            smooth_eps=1e-3).eval()
    ours.head.laplace.finalize()
    ours = ours.to(device)
    stego = StegoEvalHead(StegoHead(C, 70), ClusterProbe(70, N_CLASSES), LinearProbe(70, N_CLASSES), 2.0).eval()
    stego = stego.to(device)
    x = torch.randn(BATCH, C, GRID, GRID).to(device)

    def timed(head):
        def call() -> None:
            with torch.no_grad():
                head(x)
        return median_of(call, repeats=repeats, device=device)

    return timed(ours), timed(stego)


def run(repeats: int = 5) -> dict:
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    device = bench_device()
    try:
        t_smooth, t_crf = _smoothing_vs_crf(repeats, device)
        t_ours, t_stego = _heads(repeats, device)
    finally:
        torch.set_num_threads(previous)
    return {
        "title": f"PU-SegNet: smoothing vs CRF ({RESOLUTION} px, {N_CLASSES} classes), head throughput",
        "rows": [
            {"name": "uncertainty-aware smoothing", "value": 1.0 / t_smooth, "unit": "images/s",
             "reference": "dense CRF", "ratio": t_crf / t_smooth},
            {"name": "dense CRF", "value": 1.0 / t_crf, "unit": "images/s"},
            {"name": "PU-SegNet head (with smoothing)", "value": BATCH / t_ours, "unit": "images/s",
             "reference": "STEGO head", "ratio": t_stego / t_ours},
            {"name": "STEGO head", "value": BATCH / t_stego, "unit": "images/s"},
        ],
        "notes": [f"{THREADS} CPU thread(s), batch {BATCH} on a {GRID}x{GRID} grid of {C}-dim features; medians of "
                  f"{repeats} runs (smoothing {5 * repeats}); 1-min load average {os.getloadavg()[0]:.1f}",
                  f"smoothing and heads on {device_label(device)}; the dense CRF on the CPU, one image in one "
                  "process (in real use a CPU process pool, `shared.crf.CRFPool`, whatever the device)"],
    }


if __name__ == "__main__":
    result = run()
    for row in result["rows"]:
        ratio = f"  ({row['ratio']:.1f}x {row['reference']})" if "ratio" in row else ""
        print(f"{row['name']:>34}: {row['value']:.3g} {row['unit']}{ratio}")
    print(*result["notes"], sep="\n")
