"""Build the feature caches a set of methods will need, before any training starts (alone or under torchrun).

    python -m shared.data.build_cache --backbone dinov2_vitb14 --dataset cocostuff27 --split train --five-crop
    python -m shared.data.build_cache --backbone dinov2_vitb14 --dataset cocostuff27 --split val --resolution 320 --flip
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint <node 0>:29500 --rdzv-id caches \\
        -m shared.data.build_cache --backbone dinov2_vitb14 --dataset cocostuff27 --split train --five-crop
    python -m shared.data.build_cache --size-table      # the README's table of cache sizes

Prints one line per cache, `built <key> <path>` or `found <key> <path>`. The resolution is snapped to a multiple
of the backbone's patch exactly as the trainers snap theirs (320 -> 322 for /14), so these are the caches they
open. Under torchrun every rank computes its shard (`shared.data.cache_shards`).
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from dinov2_patched import model_spec
from shared import dist as sdist
from shared.backbone import build_backbone, snap_to_patch
from shared.data import DATASET_NAMES, build_dataset
from shared.data.cache_disk import cache_bytes, human_bytes
from shared.data.cache_files import open_cache
from shared.data.feature_cache import FeatureCache
from shared.features import DescriptorError, canonical_descriptor

# The caches the methods' paper configs read (images as the loaders yield them, at the trainers' resolutions).
# Potsdam: the specs give no tile counts; `prepare potsdam` cuts 900 tiles of 200 px from each 6000 px
# orthophoto and keeps every 5th labelled one for testing, i.e. 20 train and 4 test of the 24 labelled ones.
SIZE_TABLE_SPLITS = [
    ("COCO-Stuff-27 train (curated, five crops)", 49_629 * 5, 224),
    ("COCO-Stuff-27 val (curated)", 2_175, 320),
    ("Cityscapes-27 train (five crops)", 2_975 * 5, 224),
    ("Cityscapes-27 val", 500, 320),
    ("Potsdam-3 train (20 orthophotos x 900 tiles, five crops)", 20 * 900 * 5, 224),
    ("Potsdam-3 val (4 orthophotos x 900 tiles)", 4 * 900, 320),
]
SIZE_TABLE_BACKBONES = [("ViT-S/14", "dinov2_vits14"), ("ViT-B/14", "dinov2_vitb14"), ("ViT-B/8", "dino_vitb8")]


def split_bytes(model: str, n_images: int, resolution: int) -> int:
    """Bytes of one cache (no flip) of `n_images` at `resolution` (snapped to the patch) for backbone `model`."""
    spec = model_spec(model)
    res = snap_to_patch(resolution, spec["patch_size"])
    return cache_bytes(n_images, spec["embed_dim"], res // spec["patch_size"], res)


def size_table() -> str:
    """Markdown table of the cache sizes of SIZE_TABLE_SPLITS for SIZE_TABLE_BACKBONES (features + labels)."""
    head = "| split | images | px | " + " | ".join(label for label, _ in SIZE_TABLE_BACKBONES) + " |"
    lines = [head, "| --- | ---: | ---: |" + " ---: |" * len(SIZE_TABLE_BACKBONES)]
    for name, n, res in SIZE_TABLE_SPLITS:
        sizes = " | ".join(human_bytes(split_bytes(model, n, res)) for _, model in SIZE_TABLE_BACKBONES)
        lines.append(f"| {name} | {n:,} | {res} | {sizes} |")
    return "\n".join(lines)


def parse_descriptor(text: str | None) -> dict | None:
    """A descriptor given as JSON or YAML flow (`{kind: keys, blocks: [-3, -2, -1]}`), checked."""
    if text is None:
        return None
    try:
        return canonical_descriptor(yaml.safe_load(text))
    except yaml.YAMLError as err:
        raise DescriptorError(f"--features {text!r} is not JSON or YAML ({str(err).splitlines()[0]}); write it "
                              "like '{kind: keys, blocks: [-3, -2, -1]}'.") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m shared.data.build_cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", help="e.g. dinov2_vits14, dinov2_vitb14, dino_vitb8")
    parser.add_argument("--dataset", choices=DATASET_NAMES)
    parser.add_argument("--split", nargs="+", help="one or more splits, e.g. train val")
    parser.add_argument("--backbone-weights", default=None, help="checkpoint path, or 'none' for random weights "
                        "(default: the official weights)")
    parser.add_argument("--resolution", type=int, default=224, help="view size in px, snapped to the patch")
    parser.add_argument("--cache-dir", default="cache/features")
    parser.add_argument("--features", default=None, help="feature descriptor as JSON or YAML flow, e.g. "
                        "'{kind: keys, blocks: [-3, -2, -1]}' (default: last block's tokens)")
    parser.add_argument("--flip", action="store_true", help="also build the cache of the horizontally flipped "
                        "images (evaluation's flip averaging reads both)")
    parser.add_argument("--five-crop", action="store_true", help="the prepared five-crop set of the split")
    parser.add_argument("--data-root", default=None, help="default: $USS_DATA, else ./data")
    parser.add_argument("--batch-size", type=int, default=16, help="part of what makes the bytes reproducible")
    parser.add_argument("--num-workers", type=int, default=4, help="data-loading processes per rank")
    parser.add_argument("--device", default="auto", help="auto (cuda:<LOCAL_RANK> when there is a GPU), cpu, cuda")
    parser.add_argument("--size-table", action="store_true", help="print the README's table of cache sizes and exit")
    args = parser.parse_args(argv)
    if not args.size_table:
        missing = [flag for flag, value in [("--backbone", args.backbone), ("--dataset", args.dataset),
                                            ("--split", args.split)] if not value]
        if missing:
            parser.error(f"{', '.join(missing)} required (or --size-table)")
    return args


def build_all(args: argparse.Namespace, device) -> list[str]:
    """Build or find every requested cache; returns the `built|found <key> <path>` lines."""
    backbone = build_backbone(args.backbone, args.backbone_weights, features=parse_descriptor(args.features),
                              device=device)
    res = snap_to_patch(args.resolution, backbone.patch_size)
    if res != args.resolution and sdist.is_main_process():
        print(f"resolution {args.resolution} snapped to {res}, a multiple of patch {backbone.patch_size}", flush=True)
    cache, lines = FeatureCache(args.cache_dir), []
    for split in args.split:
        dataset = build_dataset(args.dataset, split, data_root=args.data_root, resolution=res,
                                five_crop=args.five_crop)
        for flip in (False, True) if args.flip else (False,):
            found = open_cache(cache.path_for(backbone, dataset, flip=flip)) is not None
            cached = cache.get(backbone, dataset, flip=flip, batch_size=args.batch_size, num_workers=args.num_workers,
                               progress=sdist.is_main_process())
            lines.append(f"{'found' if found else 'built'} {cached.key} {cached.path}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.size_table:
        print(size_table())
        return 0
    try:
        with sdist.distributed(args.device) as ctx:
            for line in build_all(args, ctx.device):
                if ctx.is_main:
                    print(line, flush=True)
    except (OSError, ValueError, RuntimeError) as err:  # one line per failing rank, no traceback
        rank = f"rank {os.environ['RANK']}: " if "RANK" in os.environ else ""
        print(f"build_cache: {rank}error: {str(err).strip().splitlines()[0]}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
