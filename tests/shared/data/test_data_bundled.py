"""The bundled CamVid sample loads on a fresh clone: counts, sizes, label range, licence file."""

from __future__ import annotations

import numpy as np
import pytest

from shared.data import build_dataset
from shared.data.folder import BUNDLED_ROOT


@pytest.mark.parametrize(("split", "count"), [("train", 40), ("val", 20)])
def test_bundled_sample_loads(split, count):
    ds = build_dataset("camvid_sample", split, data_root="/nonexistent")  # data_root does not matter
    assert len(ds) == count and ds.n_classes == 11 and ds.has_labels
    assert ds.class_names[0] == "sky" and ds.class_names[10] == "bicyclist"
    seen = set()
    for i in range(len(ds)):
        image, label = ds.load_raw(i)
        assert image.size == (320, 240) and label.shape == (240, 320)
        seen |= set(np.unique(label).tolist())
    assert seen <= set(range(-1, 11)) and len(seen) >= 10
    item = ds[0]
    assert item["image"].shape == (3, 224, 224) and item["label"].shape == (224, 224)


def test_bundled_sample_is_small_and_documented():
    total = sum(p.stat().st_size for p in BUNDLED_ROOT.rglob("*") if p.is_file())
    assert total < 4 * 1024 * 1024
    source = (BUNDLED_ROOT / "SOURCE.md").read_text()
    assert "Brostow" in source and "CC BY-NC 4.0" in source
