"""`prepare cityscapes`: leftImg8bit + gtFine archives -> `cityscapes/{leftImg8bit,gtFine}/<split>/<city>/`."""

from __future__ import annotations

import argparse
from pathlib import Path, PurePosixPath

from shared.data.prepare.common import extract_members, replacing_folders


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", type=Path, required=True,
                        help="folder with leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip")
    parser.add_argument("--dst", type=Path, required=True, help="data root; writes <dst>/cityscapes/")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val", "test"])


def run(args: argparse.Namespace) -> None:
    root = args.dst / "cityscapes"
    splits = set(args.splits)
    folders = [root / top / split for top in ("leftImg8bit", "gtFine") for split in sorted(splits)]

    def target(name: str, top: str, suffix: str) -> Path | None:
        parts = PurePosixPath(name).parts  # <top>/<split>/<city>/<file>
        if len(parts) != 4 or parts[0] != top or parts[1] not in splits or not parts[3].endswith(suffix):
            return None
        return building[root / top / parts[1]].joinpath(*parts[2:])

    with replacing_folders(folders, src=args.src) as building:
        n = extract_members(args.src / "leftImg8bit_trainvaltest.zip",
                            lambda m: target(m, "leftImg8bit", "_leftImg8bit.png"), "images")
        print(f"{n} images written")
        # Only the labelIds maps are read; colour, instance and polygon files are left in the archive.
        n = extract_members(args.src / "gtFine_trainvaltest.zip",
                            lambda m: target(m, "gtFine", "_gtFine_labelIds.png"), "labels")
        print(f"{n} label maps written")
