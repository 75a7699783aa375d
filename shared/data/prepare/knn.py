"""`prepare knn`: compute STEGO's nns_<backbone>_<dataset>_<split>_<crop>_<res>.npz for one split."""

from __future__ import annotations

import argparse
from pathlib import Path

from shared.cli import at_least


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--src", type=Path, default=None, help="data root (default $USS_DATA or ./data)")
    parser.add_argument("--dst", type=Path, default=Path("cache/nns"), help="folder for the nns_*.npz files")
    parser.add_argument("--backbone", default="dinov2_vits14")
    parser.add_argument("--weights", default=None, help="checkpoint path, 'none' for random, default official")
    parser.add_argument("--layer", type=int, default=-1)
    parser.add_argument("--resolution", type=at_least(8), default=224)
    parser.add_argument("--k", type=at_least(1), default=30)
    parser.add_argument("--five-crop", action="store_true")
    parser.add_argument("--batch-size", type=at_least(1), default=16)
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> None:
    from shared.backbone import build_backbone
    from shared.data import build_dataset
    from shared.data.knn import knn_path, load_or_compute_knn

    dataset = build_dataset(args.dataset, args.split, data_root=args.src, resolution=args.resolution,
                            five_crop=args.five_crop)
    backbone = build_backbone(args.backbone, args.weights, layer=args.layer, device=args.device)
    nns = load_or_compute_knn(backbone, dataset, k=args.k, nns_dir=args.dst, batch_size=args.batch_size)
    print(f"{nns.shape[0]} x {nns.shape[1]} neighbours in {knn_path(backbone, dataset, args.dst)}")
