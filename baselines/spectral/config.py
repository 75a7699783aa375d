"""Deep spectral baseline configuration: the common run keys plus the segmentation's and the naming's own."""

from __future__ import annotations

from dataclasses import dataclass

from shared.run_config import RunConfig


@dataclass
class SpectralConfig(RunConfig):
    five_crop: bool = False  # the centre views are segmented (like the k-means baseline); true uses the crops

    # Per-image segmentation (runs inside the exported program too).
    n_eigenvectors: int = 6  # first m eigenvectors of the normalised Laplacian, the trivial one included
    n_segments: int = 8  # S segments per image (fixed, so the program has no data-dependent sizes)
    # Lloyd iterations of the per-image k-means (fixed count, farthest-point init); converged by 5 on the planted
    # benchmark, and each one adds ~30 nodes to the exported program (load time grows with them).
    segment_iters: int = 8
    # Gaussian window over token distance on the feature affinity, in units of the image's longer side (0 = off).
    spatial_sigma: float = 0.2
    # Colour term, fit time only: the exported program sees features, not pixels. 0 = off.
    colour_weight: float = 0.0
    colour_sigma: float = 0.1  # in RGB units of [0, 1]
    colour_space_sigma: float = 0.1  # in units of the image's longer side

    # Naming: k-means over the training set's segment descriptors.
    n_clusters: int = 0  # 0 = the dataset's number of classes
    n_init: int = 5
    max_iter: int = 100
    weight_by_size: bool = True  # a segment weighs as many tokens as it covers
    alpha: float = 10.0  # softmax temperature of the exported logits (cosines live in [-1, 1])
    batch_size: int = 16  # images per batched eigendecomposition while fitting
