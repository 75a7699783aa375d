"""k-means baseline configuration: the common run keys plus the clustering's own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shared.config_ranges import positive, ranged
from shared.run_config import RunConfig


@dataclass
class KMeansConfig(RunConfig):
    dataset: str = "camvid_sample"
    five_crop: bool = False
    val_resolution: int = 322

    n_clusters: int = ranged(0, 0)  # 0 = the dataset's number of classes
    n_init: int = ranged(5, 1)  # seeded restarts; the lowest inertia wins
    max_iter: int = ranged(100, 1)
    init: Literal["k-means++", "random"] = "k-means++"
    max_samples: int = ranged(200_000, 1)  # patch vectors drawn (seeded) from the training features
    alpha: float = positive(10.0)  # softmax temperature of the exported cluster probe (cosines live in [-1, 1])
    linear_probe_steps: int = ranged(0, 0)  # > 0 fits a linear probe on the labels (a diagnostic, reported separately)
