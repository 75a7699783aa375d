"""`prepare cocostuff`: COCO 2017 images + stuffthingmaps -> `cocostuff/{images,annotations,curated}/`."""

from __future__ import annotations

import argparse
from pathlib import Path, PurePosixPath

from shared.atomic_io import atomic_write_text
from shared.data.cocostuff import DEFAULT_LISTS
from shared.data.prepare.common import extract_members, fail, replacing_folders

SPLITS = ("train2017", "val2017")


def normalise_id(token: str) -> str:
    """'9', '000000000009' or '000000000009.jpg' -> '000000000009' (COCO ids are zero-padded to 12 digits)."""
    stem = PurePosixPath(token.strip()).stem
    return stem.zfill(12) if stem.isdigit() else stem


def read_ids(path: Path) -> list[str]:
    if not path.is_file():
        fail(f"--ids-file {path} not found.")
    return [normalise_id(line) for line in path.read_text().splitlines() if line.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", type=Path, required=True,
                        help="folder with train2017.zip, val2017.zip and stuffthingmaps_trainval2017.zip")
    parser.add_argument("--dst", type=Path, required=True, help="data root; writes <dst>/cocostuff/")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--ids-file", type=Path, help="ids (one per line) to write as a curated list")
    parser.add_argument("--ids-split", default="val2017", choices=SPLITS, help="split the --ids-file belongs to")
    parser.add_argument("--list-name", help="curated list file name (default: the split's standard list)")
    parser.add_argument("--only-listed", action="store_true", help="extract only the --ids-file images of its split")
    parser.add_argument("--lists-only", action="store_true", help="only write the curated list, extract nothing")


def write_curated_list(root: Path, ids: list[str], split: str, list_name: str | None) -> Path:
    path = root / "curated" / split / (list_name or DEFAULT_LISTS[split])
    return atomic_write_text(path, "".join(f"{i}\n" for i in ids))


def run(args: argparse.Namespace) -> None:
    root = args.dst / "cocostuff"
    ids = read_ids(args.ids_file) if args.ids_file else None
    if ids is not None:
        print(f"wrote {len(ids)} ids to {write_curated_list(root, ids, args.ids_split, args.list_name)}")
    if args.lists_only:
        return
    if args.only_listed and ids is None:
        fail("--only-listed needs --ids-file.")
    for split in args.splits:
        extract_split(args.src, root, split, set(ids) if (args.only_listed and split == args.ids_split) else None)


def extract_split(src: Path, root: Path, split: str, keep: set[str] | None) -> None:
    """Replace `images/<split>` and `annotations/<split>` by the split's members (only the `keep` ids if given)."""
    image_dir, label_dir = root / "images" / split, root / "annotations" / split

    def target(name: str, folder: Path, suffix: str) -> Path | None:
        member = PurePosixPath(name)
        if member.parent.name != split or member.suffix != suffix or (keep and member.stem not in keep):
            return None
        return building[folder] / member.name

    with replacing_folders([image_dir, label_dir], src=src) as building:
        n = extract_members(src / f"{split}.zip", lambda m: target(m, image_dir, ".jpg"), f"images {split}")
        print(f"{split}: {n} images written")
        n = extract_members(src / "stuffthingmaps_trainval2017.zip", lambda m: target(m, label_dir, ".png"),
                            f"labels {split}")
        print(f"{split}: {n} label maps written")
