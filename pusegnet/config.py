"""PU-SegNet configuration: the values the paper states as defaults; the open choices are documented in README.md."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from shared.config_ranges import Rule, checked, non_negative, positive, probability, ranged, resume_may_differ
from shared.run_config import RunConfig

ODD = Rule("an odd integer >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1 and v % 2 == 1,
           good=(1, 3, 5), bad=(0, 2, -1))


@dataclass
class PusegnetConfig(RunConfig):
    # The pretrained unsupervised model whose pseudo-labels we train on (an exported STEGO / EAGLE / PriMaPs).
    base_segmenter: str = "run:stego"
    pseudo_label_dir: str = resume_may_differ("")  # "" = beside the feature cache: <cache_dir>/../pseudo_labels

    # Head: SNGP (sngp=false: the deterministic ablation, no spectral norm and no GP output layer).
    sngp: bool = True
    hidden_dim: int = ranged(256, 1)
    n_layers: int = ranged(2, 0)
    dropout: float = ranged(0.1, 0, 1, high_open=True)
    spec_norm_bound: float = positive(0.95)
    projection_dim: int = ranged(128, 1)
    n_random_features: int = ranged(1024, 1)
    # RBF kernel length scale on the layer-normed GP input (SNGP's scale 2).
    gp_lengthscale: float = positive(math.sqrt(2.0))
    gp_ridge: float = positive(1.0)  # tau: prior precision of the output layer
    likelihood: Literal["logistic", "gaussian"] = "logistic"  # precision weight p(1-p), or 1 ("gaussian")
    precision_mode: Literal["last_epoch", "momentum"] = "last_epoch"
    precision_momentum: float = probability(0.999)
    precision_pixels: int = ranged(64, 1)  # pixels per image added to the precision per step (random subsample)
    mean_field_factor: float = non_negative(math.pi / 8)

    # Losses.
    lambda_sim: float = non_negative(1.0)
    shift: float = 0.2  # b
    pointwise: bool = True
    sim_samples: int = ranged(64, 1)  # pixels sampled per image for the similarity pairs (within and across images)

    # Uncertainty-aware smoothing (exported as smoothed_logits).
    smooth_iterations: int = ranged(5, 0)
    smooth_percentile: float = ranged(70.0, 0, 100)
    smooth_window: int = checked(3, ODD)
    smooth_sigma: float = positive(0.5)  # on |n(h_i) - n(h_j)|^2 in [0, 4] of L2-normalised backbone features
    smooth_eps: float = positive(1e-3)

    # Optimisation.
    lr_head: float = positive(5e-4)
    lr_linear: float = positive(5e-3)
    batch_size: int = ranged(32, 1)
    max_steps: int = ranged(5000, 1)
    linear_label_stride: int = ranged(4, 1)  # the diagnostic linear probe scores every 4th label pixel (as STEGO's)
    linear_probe: bool = True

    # Calibration block.
    calibration_bins: int = ranged(15, 1)
