"""Deep spectral baseline configuration: the common run keys plus the segmentation's and the naming's own."""

from __future__ import annotations

from dataclasses import dataclass

from shared.config_ranges import non_negative, positive, ranged
from shared.run_config import RunConfig


@dataclass
class SpectralConfig(RunConfig):
    five_crop: bool = False  # the centre views are segmented (like the k-means baseline); true uses the crops

    # Per-image segmentation (runs inside the exported program too).
    n_eigenvectors: int = ranged(6, 1)  # first m eigenvectors of the normalised Laplacian, the trivial one included
    n_segments: int = ranged(8, 1)  # S segments per image (fixed, so the program has no data-dependent sizes)
    # Lloyd iterations of the per-image k-means (fixed count, farthest-point init); converged by 5 on the planted
    # benchmark, and each one adds ~30 nodes to the exported program (load time grows with them).
    segment_iters: int = ranged(8, 0)
    # Gaussian window over token distance on the feature affinity, in units of the image's longer side (0 = off).
    spatial_sigma: float = non_negative(0.2)
    # Colour term, fit time only: the exported program sees features, not pixels. 0 = off.
    colour_weight: float = non_negative(0.0)
    colour_sigma: float = positive(0.1)  # in RGB units of [0, 1]
    colour_space_sigma: float = positive(0.1)  # in units of the image's longer side

    # Naming: k-means over the training set's segment descriptors.
    n_clusters: int = ranged(0, 0)  # 0 = the dataset's number of classes
    n_init: int = ranged(5, 1)
    max_iter: int = ranged(100, 1)
    weight_by_size: bool = True  # a segment weighs as many tokens as it covers
    alpha: float = positive(10.0)  # softmax temperature of the exported logits (cosines live in [-1, 1])
    batch_size: int = ranged(16, 1)  # images per batched eigendecomposition while fitting
