"""Segment your own images with a trained segmenter: `make predict` / `python -m shared.predict`.

    python -m shared.predict --segmenter runs/stego/camvid_sample/demo --images photos/ --out predictions/ \
        [--post none|smooth|crf] [--mapping compare_output/camvid_sample/results.json] [--device auto] \
        [--batch-size 8] [--overlap 0.33] [--backbone-weights PATH|none] [--overwrite]

Images of any size, aspect ratio and mode (grayscale, RGBA, palette; EXIF orientation applied) run through the
segmenter's own backbone and features at its resolution, in sliding windows (see `shared.sliding_window`); the
averaged logits are upsampled to the original size. Per image, under --out (the folder tree of --images kept):

    labels/<name>.png     cluster ids, or dataset class ids with --mapping (255 = a cluster matched to no class)
    overlay/<name>.png    the ids in the dataset's palette blended onto the image
    variance/<name>.png   the head's variance map (magma, per-image range) when the method has one
    index.csv             file, width, height, seconds, mean_variance, status, error: one row per image

Images whose outputs exist are skipped (--overwrite redoes them); every file is written atomically. Exit code 0
when every image succeeded, 1 when some failed (listed in index.csv; the others still run), 2 for bad input.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from shared.predict_io import (
    failed_row,
    label_image,
    list_images,
    load_mapping,
    output_paths,
    read_image,
    read_index,
    segmenter_file,
    write_index,
    write_png,
)
from shared.sliding_window import (
    DEFAULT_OVERLAP,
    WindowAccumulator,
    argmax_channels,
    resized_view,
    upsample_rows,
    windows,
)

POSTS = ("none", "smooth", "crf")


@dataclass
class PredictOptions:
    segmenter: str
    images: str
    out: str
    post: str = "none"
    mapping: str | None = None
    device: str = "auto"
    batch_size: int = 8
    overlap: float = DEFAULT_OVERLAP
    backbone_weights: str | None = None
    overwrite: bool = False


@dataclass
class Job:
    """One image in flight: its view, the windows still to run and the accumulated head outputs."""

    file: str
    name: str
    rgb: np.ndarray  # (H, W, 3) uint8, the original
    view: torch.Tensor  # (3, H', W') normalised
    accumulator: WindowAccumulator
    pending: int
    boxes: list[tuple[int, int]] = field(default_factory=list)  # (top, left) of every window
    seconds: float = 0.0


@dataclass
class Predictor:
    """Everything fixed for a run: the loaded models, what to read from the head, how to colour and name."""

    segmenter: torch.nn.Module
    backbone: torch.nn.Module
    resolution: int
    keys: tuple[str, ...]  # logits key first, then "variance" when the head has one
    mapping: np.ndarray | None
    palette: np.ndarray
    options: PredictOptions
    device: torch.device
    rows: dict[str, dict] = field(default_factory=dict)  # index.csv rows by file
    skipped: list[str] = field(default_factory=list)  # files whose outputs existed

    @property
    def has_variance(self) -> bool:
        return "variance" in self.keys


def build_predictor(options: PredictOptions) -> Predictor:
    """Load and check everything before anything is written; ValueError (one sentence) for bad input."""
    from dinov2_patched import RANDOM_WEIGHTS_ID
    from shared import dist as sdist
    from shared.backbone import build_backbone, snap_to_patch
    from shared.segmenter import load
    from shared.viz import palette_for

    if options.post not in POSTS:
        raise ValueError(f"--post {options.post!r} is unknown; use one of {list(POSTS)}.")
    device = sdist.resolve_device(options.device)
    path = segmenter_file(options.segmenter)
    segmenter = load(path, map_location=device).eval()
    meta = segmenter.metadata
    with torch.no_grad():
        produced = set(segmenter(torch.zeros(2, meta["feature_dim"], 2, 2, device=device)))
    if options.post == "smooth" and "smoothed_logits" not in produced:
        raise ValueError(f"--post smooth: {path} ({meta['method']}) exports no own post-processing "
                         "(smoothed_logits); use --post none or --post crf.")
    mapping = load_mapping(options.mapping, meta, path) if options.mapping else None
    out = Path(options.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder (it is created when missing).")
    weights = options.backbone_weights
    if not weights and meta["backbone_weights_id"] == RANDOM_WEIGHTS_ID:
        weights = "none"
        print(f"note: {path} was trained on a random (untrained) {meta['backbone']}; predicting with the same "
              "random backbone weights, as the segmenter was trained", file=sys.stderr)
    backbone = build_backbone(meta["backbone"], weights, features=meta["features"], device=device)
    if backbone.weights_id != meta["backbone_weights_id"]:
        raise ValueError(f"{path} was trained on {meta['backbone']} weights {meta['backbone_weights_id']} but "
                         f"{backbone.weights_id} were loaded; pass --backbone-weights with the file it was trained on.")
    keys = ("smoothed_logits" if options.post == "smooth" else "cluster_logits",)
    keys += ("variance",) if "variance" in produced else ()
    n_colours = meta["n_classes"] if mapping is not None else meta["n_clusters"]
    return Predictor(segmenter=segmenter, backbone=backbone,
                     resolution=snap_to_patch(int(meta["resolution"]), backbone.patch_size), keys=keys,
                     mapping=mapping, palette=palette_for(meta["dataset"], n_colours), options=options,
                     device=device)


def finish_job(predictor: Predictor, job: Job, probabilities: np.ndarray | None = None) -> dict:
    """Upsample, take the ids, write the PNGs; returns the index row."""
    from shared.viz import colorize, overlay, uncertainty_colormap

    started = time.perf_counter()
    height, width = job.rgb.shape[:2]
    source = torch.from_numpy(probabilities) if probabilities is not None else job.accumulator.mean(predictor.keys[0])
    ids = upsample_rows(source, (height, width), reduce=argmax_channels)
    coloured_ids, stored = label_image(ids, predictor.mapping)
    paths = output_paths(Path(predictor.options.out), job.name, predictor.has_variance)
    mean_variance = ""
    if predictor.has_variance:
        variance = upsample_rows(job.accumulator.mean("variance"), (height, width))[0]
        mean_variance = float(variance.mean())
        write_png(paths["variance"], uncertainty_colormap(variance), durable=False)
    write_png(paths["overlay"], overlay(job.rgb, colorize(coloured_ids, predictor.palette)), durable=False)
    write_png(paths["labels"], stored)  # last: its presence marks the image as done
    seconds = job.seconds + time.perf_counter() - started
    return {"file": job.file, "width": width, "height": height, "seconds": round(seconds, 4),
            "mean_variance": mean_variance, "status": "ok", "error": ""}


# ----------------------------------------------------------------------------------------------- the loop


def _run_windows(predictor: Predictor, batch: Sequence[tuple[Job, int, int]]) -> None:
    """Backbone and head on a batch of windows (from one or several images); accumulate into their jobs."""
    started = time.perf_counter()
    r = predictor.resolution
    crops = torch.stack([job.view[:, top: top + r, left: left + r] for job, top, left in batch]).to(predictor.device)
    with torch.no_grad():
        outputs = predictor.segmenter(predictor.backbone(crops))
    for i, (job, top, left) in enumerate(batch):
        job.accumulator.add({key: outputs[key][i] for key in predictor.keys}, top, left)
        job.pending -= 1
    share = (time.perf_counter() - started) / len(batch)
    for job, _, _ in batch:
        job.seconds += share


def _finish(predictor: Predictor, jobs: list[Job], pool) -> None:
    """Write the finished jobs (through the CRF pool first for --post crf); a failure is recorded, not raised."""
    probabilities: list = [None] * len(jobs)
    if pool is not None and jobs:
        started = time.perf_counter()
        probabilities = pool.run([job.view for job in jobs], [job.accumulator.mean(predictor.keys[0]) for job in jobs])
        for job in jobs:
            job.seconds += (time.perf_counter() - started) / len(jobs)
    for job, probs in zip(jobs, probabilities, strict=True):
        try:
            if pool is not None and probs is None:
                raise TimeoutError("the dense CRF timed out")
            predictor.rows[job.file] = finish_job(predictor, job, probs)
        except Exception as error:  # noqa: BLE001 - one image's failure is reported, the others go on
            predictor.rows[job.file] = failed_row(job.file, error)


def _new_job(predictor: Predictor, rgb: np.ndarray, file: str = "", name: str = "") -> Job:
    """The resized view of an image, its windows and an empty accumulator on its feature grid."""
    patch = predictor.backbone.patch_size
    view, _ = resized_view(rgb, predictor.resolution, patch)
    grid = (view.shape[1] // patch, view.shape[2] // patch)
    boxes = windows(view.shape[1], view.shape[2], predictor.resolution, patch, predictor.options.overlap)
    return Job(file=file, name=name, rgb=rgb, view=view, accumulator=WindowAccumulator(predictor.keys, grid, patch),
               pending=len(boxes), boxes=boxes)


def image_outputs(predictor: Predictor, rgb: np.ndarray) -> dict[str, torch.Tensor]:
    """One uint8 RGB image (H, W, 3) -> its window-averaged head outputs at feature resolution: {key: (C, h, w)}
    (variance as (1, h, w)), before upsampling; the code path of `predict`, without the files."""
    job = _new_job(predictor, rgb)
    size = predictor.options.batch_size
    for start in range(0, len(job.boxes), size):
        _run_windows(predictor, [(job, top, left) for top, left in job.boxes[start: start + size]])
    return {key: job.accumulator.mean(key) for key in predictor.keys}


class _Queue:
    """Windows waiting for the backbone, batched across images; finished images are written as they complete."""

    def __init__(self, predictor: Predictor, pool, progress) -> None:
        self.predictor, self.pool, self.progress = predictor, pool, progress
        self.windows: list[tuple[Job, int, int]] = []
        self.jobs: list[Job] = []

    def add(self, job: Job) -> None:
        self.windows += [(job, top, left) for top, left in job.boxes]
        self.jobs.append(job)
        while len(self.windows) >= self.predictor.options.batch_size:
            self.step()

    def flush(self) -> None:
        while self.windows:
            self.step()

    def step(self) -> None:
        size = self.predictor.options.batch_size
        batch, self.windows = self.windows[:size], self.windows[size:]
        try:
            _run_windows(self.predictor, batch)
        except Exception as error:  # noqa: BLE001 - these images fail (e.g. out of memory), the others go on
            failed = {id(job) for job, _, _ in batch}
            for job in [j for j in self.jobs if id(j) in failed]:
                self.predictor.rows[job.file] = failed_row(job.file, error)
            self.windows = [w for w in self.windows if id(w[0]) not in failed]
            self.jobs = [j for j in self.jobs if id(j) not in failed]
            self.progress.update(len(failed))
            return
        finished = [job for job in self.jobs if job.pending == 0]
        self.jobs = [job for job in self.jobs if job.pending > 0]
        if finished:
            _finish(self.predictor, finished, self.pool)
            self.progress.update(len(finished))
            write_index(Path(self.predictor.options.out).expanduser(), self.predictor.rows)


def predict(options: PredictOptions, predictor: Predictor | None = None) -> Predictor:
    """Run the whole prediction (with `predictor`'s models when given); returns the predictor with the index rows
    by file (`rows`) and the skipped files (`skipped`). Raises ValueError (or FileNotFoundError) for bad input."""
    from tqdm import tqdm

    from shared.crf import CRFPool

    out = Path(options.out).expanduser()
    images = list_images(options.images, out)
    predictor = replace(predictor, options=options, rows={}, skipped=[]) if predictor else build_predictor(options)
    previous = read_index(out)
    todo = []
    root = Path(options.images).expanduser()
    for path, name in images:
        file = path.name if root.is_file() else str(path.relative_to(root))
        done = all(p.is_file() for p in output_paths(out, name, predictor.has_variance).values())
        if done and not options.overwrite:
            predictor.rows[file] = previous.get(file) or {"file": file, "status": "ok"}
            predictor.skipped.append(file)
        else:
            todo.append((path, file, name))
    out.mkdir(parents=True, exist_ok=True)
    pool = CRFPool() if options.post == "crf" else None
    progress = tqdm(total=len(todo), unit="image", desc="predict", disable=not todo)
    queue = _Queue(predictor, pool, progress)
    try:
        for path, file, name in todo:
            try:
                started = time.perf_counter()
                job = _new_job(predictor, read_image(path), file, name)
                job.seconds = time.perf_counter() - started
            except Exception as error:  # noqa: BLE001 - an unreadable image is reported, the others go on
                predictor.rows[file] = failed_row(file, error)
                progress.update(1)
                continue
            queue.add(job)
        queue.flush()
    finally:
        progress.close()
        if pool is not None:
            pool.close()
    write_index(out, predictor.rows)
    return predictor


def parse_args(argv: list[str] | None = None) -> PredictOptions:
    parser = argparse.ArgumentParser(prog="python -m shared.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--segmenter", required=True, help="a run directory or its export/segmenter.pt2")
    parser.add_argument("--images", required=True, help="a folder of images (searched recursively) or one image")
    parser.add_argument("--out", required=True, help="output folder (created when missing)")
    parser.add_argument("--post", choices=POSTS, default="none",
                        help="none; smooth: the method's own post-processing (smoothed_logits); crf: dense CRF")
    parser.add_argument("--mapping", default=None,
                        help="a compare results.json holding this segmenter's cluster -> class mapping")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per backbone call")
    parser.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP, help="window overlap fraction, [0, 1)")
    parser.add_argument("--backbone-weights", default=None,
                        help="weights file or 'none'; default: what the segmenter was trained on")
    parser.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or not 0.0 <= args.overlap < 1.0:
        parser.error("--batch-size must be >= 1 and --overlap in [0, 1)")
    return PredictOptions(**vars(args))


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        predictor = predict(options)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}",
              file=sys.stderr)
        return 2
    rows = predictor.rows
    failed = [row for row in rows.values() if row.get("status") == "failed"]
    print(f"{len(rows) - len(predictor.skipped) - len(failed)} images segmented, {len(predictor.skipped)} skipped "
          f"(outputs exist; --overwrite redoes them), {len(failed)} failed; index: {Path(options.out) / 'index.csv'}")
    for row in failed:
        print(f"  failed: {row['file']}: {row['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
