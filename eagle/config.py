"""EAGLE configuration: a typed dataclass whose defaults are the paper's COCO-Stuff-27 values (the released
`train_config_cocostuff.yml`); `configs/cityscapes27.yaml` holds the Cityscapes differences."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from eagle.losses import CorrespondenceSettings
from shared.config_ranges import non_negative, positive, probability, ranged
from shared.run_config import RunConfig

KEYS_DESCRIPTOR: dict[str, Any] = {"kind": "keys", "blocks": [-3, -2, -1]}


@dataclass
class EagleConfig(RunConfig):
    # The head reads the keys of the last three blocks (heads merged): 3·C channels.
    features: dict[str, Any] = field(default_factory=lambda: dict(KEYS_DESCRIPTOR))
    backbone: str = "dino_vits8"  # the paper's COCO backbone (ViT-B/8 for Cityscapes)

    # Head and projection.
    code_dim: int = ranged(512, 1)
    dropout: float = ranged(0.1, 0, 1, high_open=True)
    nonlinear: bool = True

    # The second view: x with a 3x3 Gaussian blur applied with probability blur_p, σ ~ U(blur_sigma_min, max)
    # (torchvision's RandomApply(GaussianBlur(3)) defaults, as in the original).
    blur_p: float = probability(0.5)
    blur_sigma_min: float = positive(0.1)
    blur_sigma_max: float = positive(2.0)

    # EiCue.
    eigen_k: int = ranged(4, 2)  # eigenvectors kept, the trivial one included (k - 1 = 3 enter the eigen probe)
    eigen_clusters: int = ranged(32, 1)  # centres of each eigen cluster probe (28 for Cityscapes)
    colour: Literal["original", "rgb"] = "original"  # "rgb": un-normalised colours, see eagle/eicue.py
    colour_sigma: float = positive(0.1)
    eigen_solver: Literal["auto", "dense", "subset", "arpack"] = "auto"

    # Object-centric contrastive loss.
    temperature: float = positive(0.07)
    global_weight: float = probability(0.7)
    obj_weight: float = non_negative(0.85)  # applied to each direction
    label_smoothing: float = ranged(0.0, 0, 1, high_open=True)  # 0.1 on Cityscapes

    # Modified correspondence loss.
    lambda_pos: float = non_negative(0.25)
    lambda_neg: float = non_negative(0.63)
    shift_bias: float = 0.0
    shift_value: float = 3.5
    feature_samples: int = ranged(11, 1)
    neg_samples: int = ranged(5, 1)
    pointwise: bool = True
    zero_clamp: bool = True
    stabilize: bool = True

    # Schedule: u = 0 up to step `schedule_step`, then `schedule_limit`.
    schedule_step: int = 200  # any integer: u > 0 after 0-based step schedule_step (-1: from the first step)
    schedule_limit: float = probability(0.9)

    # Optimisation: one Adam per part, no schedule.
    lr_head: float = positive(5e-4)  # head and projection
    lr_linear: float = positive(1e-3)
    lr_cluster: float = positive(5e-3)
    lr_eigen: float = positive(5e-5)  # each eigen cluster probe (5e-4 for Cityscapes)
    batch_size: int = ranged(32, 1)
    max_steps: int = ranged(10000, 1)
    # 1 = the original (the probe's loss on every label pixel); s > 1 scores every s-th pixel each way: cheaper,
    # and the probe is a diagnostic that never moves the head.
    linear_label_stride: int = ranged(1, 1)

    # Probes.
    n_extra_clusters: int = ranged(5, 0)
    alpha: float = positive(4.0)  # cluster-probe softmax temperature at evaluation

    def correspondence(self) -> CorrespondenceSettings:
        """The correspondence loss's settings from this config."""
        return CorrespondenceSettings(
            lambda_pos=self.lambda_pos, lambda_neg=self.lambda_neg, shift_bias=self.shift_bias,
            shift_value=self.shift_value, feature_samples=self.feature_samples, neg_samples=self.neg_samples,
            pointwise=self.pointwise, zero_clamp=self.zero_clamp, stabilize=self.stabilize)
