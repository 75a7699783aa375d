"""`prepare five_crop`: cut every image of a split into four corners + centre, int(0.5 H) x int(0.5 W).

Writes `<dst>/cropped/<dataset>_five_crop_0.5/{img,label}/<split>/<5*i+k>.{jpg,png}`, k = 0 top-left,
1 top-right, 2 bottom-left, 3 bottom-right, 4 centre. Labels are stored as class id + 1 (0 = ignore).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shared.data.five_crop import CROP_RATIO, five_crop_dir
from shared.data.prepare.common import atomic_save_image, replacing_folders


def five_crop_windows(h: int, w: int, ratio: float = CROP_RATIO) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of the five crops, in the order top-left, top-right, bottom-left,
    bottom-right, centre."""
    ch, cw = int(ratio * h), int(ratio * w)
    centre = (int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0)))
    corners = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), centre]
    return [(top, left, ch, cw) for top, left in corners]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="dataset name, e.g. cocostuff27")
    parser.add_argument("--split", default="train")
    parser.add_argument("--src", type=Path, default=None, help="data root holding the dataset")
    parser.add_argument("--dst", type=Path, default=None, help="data root to write cropped/ into (default --src)")
    parser.add_argument("--n-classes", type=int, default=None, help="folder datasets only")
    parser.add_argument("--ignore-id", type=int, default=255, help="folder datasets only")


def write_five_crops(dataset, image_dir: Path, label_dir: Path) -> int:
    """Write the crops of every image of `dataset` into `image_dir` (and `label_dir`); returns the number of crops."""
    n = 0
    for i in tqdm(range(len(dataset)), desc=f"five-crop {dataset.name}/{dataset.split}", unit="img"):
        image, label = dataset.load_arrays(i)  # (H, W, 3) uint8, (H, W) int64 or None
        for k, (top, left, ch, cw) in enumerate(five_crop_windows(*image.shape[:2])):
            index = 5 * i + k
            window = np.s_[top : top + ch, left : left + cw]
            atomic_save_image(np.ascontiguousarray(image[window]), image_dir / f"{index}.jpg", quality=95)
            if label is not None:
                atomic_save_image((label[window] + 1).astype(np.uint8), label_dir / f"{index}.png")
            n += 1
    return n


def run(args: argparse.Namespace) -> None:
    from shared.data import build_dataset
    from shared.data.base import resolve_data_root

    options = {"n_classes": args.n_classes, "ignore_id": args.ignore_id} if args.dataset == "folder" else {}
    dataset = build_dataset(args.dataset, args.split, data_root=args.src, **options)
    out_dir = five_crop_dir(resolve_data_root(args.dst or args.src), dataset.name)
    image_dir, label_dir = out_dir / "img" / args.split, out_dir / "label" / args.split
    with replacing_folders([image_dir, label_dir]) as building:  # --src is the data root that holds out_dir
        n = write_five_crops(dataset, building[image_dir], building[label_dir])
    print(f"{n} crops written to {out_dir}")
