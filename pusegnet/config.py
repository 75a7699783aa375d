"""PU-SegNet configuration: the values the paper states as defaults; the open choices are documented in README.md."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from shared.run_config import RunConfig


@dataclass
class PusegnetConfig(RunConfig):
    # The pretrained unsupervised model whose pseudo-labels we train on (an exported STEGO / EAGLE / PriMaPs).
    base_segmenter: str = "run:stego"
    pseudo_label_dir: str = ""  # "" = beside the feature cache: <cache_dir>/../pseudo_labels

    # Head: SNGP (sngp=false: the deterministic ablation, no spectral norm and no GP output layer).
    sngp: bool = True
    hidden_dim: int = 256
    n_layers: int = 2
    dropout: float = 0.1
    spec_norm_bound: float = 0.95
    projection_dim: int = 128
    n_random_features: int = 1024
    gp_lengthscale: float = math.sqrt(2.0)  # RBF kernel length scale on the layer-normed GP input (SNGP's scale 2)
    gp_ridge: float = 1.0  # tau: prior precision of the output layer
    likelihood: Literal["logistic", "gaussian"] = "logistic"  # precision weight p(1-p), or 1 ("gaussian")
    precision_mode: Literal["last_epoch", "momentum"] = "last_epoch"
    precision_momentum: float = 0.999
    precision_pixels: int = 64  # pixels per image added to the precision per step (random subsample)
    mean_field_factor: float = math.pi / 8

    # Losses.
    lambda_sim: float = 1.0
    shift: float = 0.2  # b
    pointwise: bool = True
    sim_samples: int = 64  # pixels sampled per image for the similarity pairs (within and across images)

    # Uncertainty-aware smoothing (exported as smoothed_logits).
    smooth_iterations: int = 5
    smooth_percentile: float = 70.0
    smooth_window: int = 3
    smooth_sigma: float = 0.5  # on |n(h_i) - n(h_j)|^2 in [0, 4] of L2-normalised backbone features
    smooth_eps: float = 1e-3

    # Optimisation.
    lr_head: float = 5e-4
    lr_linear: float = 5e-3
    batch_size: int = 32
    max_steps: int = 5000
    linear_label_stride: int = 4  # the diagnostic linear probe scores every 4th label pixel (as STEGO's)
    linear_probe: bool = True

    # Calibration block.
    calibration_bins: int = 15
