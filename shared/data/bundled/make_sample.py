"""Make the bundled CamVid sample (run once by the maintainers; the project never reads --src at run time).

    python shared/data/bundled/make_sample.py --src /path/to/camvid --dst shared/data/bundled/camvid_sample

--src holds `images/{train,val}/*.jpg` and `labels/{train,val}/*.png` (480x360, ids 0-10, 11 void).
Frames are taken evenly spaced over the sorted file names, which spreads them across the video sequences.
Images: bilinear with antialiasing, JPEG quality 90. Labels: nearest neighbour, so no new ids appear.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = (320, 240)  # (W, H)
COUNTS = {"train": 40, "val": 20}


def evenly_spaced(items: list[Path], n: int) -> list[Path]:
    """n items at evenly spaced positions (the first included), in order."""
    if n >= len(items):
        return items
    positions = np.linspace(0, len(items), n, endpoint=False).astype(int)
    return [items[p] for p in positions]


def make_sample(src: Path, dst: Path) -> None:
    for split, n in COUNTS.items():
        images = sorted((src / "images" / split).glob("*.jpg"))
        if not images:
            raise SystemExit(f"No images in {src / 'images' / split}; pass the CamVid folder as --src.")
        (dst / "images" / split).mkdir(parents=True, exist_ok=True)
        (dst / "labels" / split).mkdir(parents=True, exist_ok=True)
        for image_path in evenly_spaced(images, n):
            label_path = src / "labels" / split / f"{image_path.stem}.png"
            with Image.open(image_path) as im:
                im.convert("RGB").resize(SIZE, Image.BILINEAR, reducing_gap=None).save(
                    dst / "images" / split / image_path.name, quality=90)
            with Image.open(label_path) as lab:
                Image.fromarray(np.asarray(lab).astype(np.uint8)).resize(SIZE, Image.NEAREST).save(
                    dst / "labels" / split / label_path.name, optimize=True)
        print(f"{split}: {min(n, len(images))} frames")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help="CamVid folder with images/ and labels/")
    parser.add_argument("--dst", type=Path, default=Path(__file__).parent / "camvid_sample")
    args = parser.parse_args()
    make_sample(args.src, args.dst)


if __name__ == "__main__":
    main()
