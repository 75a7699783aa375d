"""`shared.predict` throughput against the backbone alone: ViT-S/14 at 322 px, STEGO head, no CRF, 2 CPU threads.

    python -m benchmarks.predict [--repeats 3]

A STEGO evaluation head (paper sizes: code 70, 27 classes; untrained, random ViT-S/14 weights: the speed does not
depend on the values) is exported with `shared.segmenter.save` and run by `shared.predict.predict` on JPEG files
on disk, everything included: decoding, resizing, windows, backbone, head, upsampling to the original size, the
labels / overlay PNGs and index.csv (the models are loaded once, outside the timing, as a long run amortises
them). The reference is the same backbone's forward on batches of the same 322 x 322 windows, timed interleaved
with predict, one pass each per round, so a busy shared machine slows both alike; figures are medians over rounds.
Both run on the benchmarks' device (`bench_device()`, predict's --device); decoding and writing stay on the CPU.

Two image sets: 400 x 400 photos (one window each after resizing: images/s compare directly with the backbone's),
and 480 x 360 photos (CamVid's aspect, two overlapping windows each), reported as windows/s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.timing import bench_device, device_label, seconds
from shared.backbone import build_backbone
from shared.predict import PredictOptions, build_predictor, predict
from shared.segmenter import save
from stego.config import StegoConfig
from stego.steps import build_modules, eval_head

RESOLUTION, BATCH, THREADS, N_IMAGES, N_CLASSES = 322, 8, 2, 8, 27
SIZES = {"square": (400, 400), "camvid": (360, 480)}  # (height, width)


def _export(folder: Path) -> Path:
    """A STEGO head at the paper's sizes for ViT-S/14 features, exported like a trained run's."""
    torch.manual_seed(0)
    cfg = StegoConfig()
    modules = build_modules(cfg, 384, N_CLASSES)
    meta = {"method": "stego", "backbone": "dinov2_vits14", "backbone_weights_id": "random-seed0",
            "pretrained_backbone": False, "features": {"kind": "tokens", "layer": -1}, "resolution": RESOLUTION,
            "n_classes": N_CLASSES, "n_clusters": N_CLASSES + cfg.n_extra_clusters, "code_dim": cfg.code_dim,
            "dataset": "cocostuff27", "probabilistic": False, "selected_by": "last"}
    head = eval_head(modules, cfg.alpha).eval()
    return save(folder / "segmenter.pt2", head, torch.randn(2, 384, 4, 5), meta)


def _images(folder: Path, size: tuple[int, int]) -> Path:
    """N_IMAGES smooth random JPEGs (upsampled noise, so the JPEG coder sees photo-like content)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(N_IMAGES):
        low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        low.resize((size[1], size[0]), Image.BICUBIC).save(folder / f"{i:03d}.jpg", quality=90)
    return folder


def measure(repeats: int = 3) -> dict[str, float]:
    """Medians over `repeats` interleaved rounds: backbone windows/s and predict images/s per image set."""
    torch.set_num_threads(THREADS)
    device = bench_device()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        segmenter = _export(root)
        folders = {name: _images(root / name, size) for name, size in SIZES.items()}
        options = {name: PredictOptions(segmenter=str(segmenter), images=str(folder), out=str(root / f"out_{name}"),
                                        device=str(device), batch_size=BATCH, overwrite=True)
                   for name, folder in folders.items()}
        predictor = build_predictor(options["square"])
        backbone = build_backbone("dinov2_vits14", "none", device=device)
        windows = torch.randn(BATCH, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0)).to(device)
        runs = {"backbone": lambda: backbone(windows)}
        runs |= {name: (lambda o=o: predict(o, predictor)) for name, o in options.items()}
        for fn in runs.values():
            fn()  # warm-up
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, fn in runs.items():
                times[name].append(seconds(fn, device))
        n_windows = {name: len(predictor_windows(folder)) for name, folder in folders.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    return {"backbone_windows_per_s": BATCH / median["backbone"],
            "square_images_per_s": N_IMAGES / median["square"],
            "camvid_images_per_s": N_IMAGES / median["camvid"],
            "camvid_windows_per_s": n_windows["camvid"] / median["camvid"],
            "square_windows_per_image": n_windows["square"] / N_IMAGES,
            "camvid_windows_per_image": n_windows["camvid"] / N_IMAGES}


def predictor_windows(folder: Path) -> list[tuple[int, int]]:
    """Every window predict runs over the images of `folder` (from the same geometry functions)."""
    from shared.sliding_window import resized_size, windows

    boxes = []
    for path in sorted(folder.glob("*.jpg")):
        width, height = Image.open(path).size
        boxes += windows(*resized_size(height, width, RESOLUTION, 14), RESOLUTION, 14)
    return boxes


def run(repeats: int = 3) -> dict:
    """benchmarks.run_all schema: predict's rate against the backbone's, the target being >= 0.8x."""
    m = measure(repeats)
    rows = [
        {"name": "backbone alone, 322 x 322 windows", "value": m["backbone_windows_per_s"], "unit": "images/s"},
        {"name": "predict, 400 x 400 JPEGs (1 window each)", "value": m["square_images_per_s"], "unit": "images/s",
         "reference": "backbone alone, 322 x 322 windows",
         "ratio": m["square_images_per_s"] / m["backbone_windows_per_s"]},
        {"name": "predict, 480 x 360 JPEGs (2 windows each)", "value": m["camvid_windows_per_s"], "unit": "windows/s",
         "reference": "backbone alone, 322 x 322 windows",
         "ratio": m["camvid_windows_per_s"] / m["backbone_windows_per_s"]},
    ]
    notes = [f"on {device_label(bench_device())}: random ViT-S/14 weights, STEGO head (code 70, {N_CLASSES} "
             f"classes), no CRF, batch {BATCH} windows, {THREADS} CPU threads, medians of {repeats} interleaved "
             "rounds; target: ratio >= 0.8",
             f"480 x 360 photos: {m['camvid_images_per_s']:.3g} images/s ({m['camvid_windows_per_image']:.0f} "
             "windows each: the short side goes to 322 px, the long side to 434 px)"]
    return {"title": "Predict throughput, dinov2_vits14 at 322 px, STEGO head", "rows": rows, "notes": notes,
            "metrics": m}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    for key, value in measure(args.repeats).items():
        print(f"  {key:<28} {value:.4g}")


if __name__ == "__main__":
    main()
