"""STEGO configuration: a typed dataclass whose defaults are the paper's ("default config" row of the spec)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.run_config import RunConfig
from stego.losses import CorrespondenceWeights


@dataclass
class StegoConfig(RunConfig):
    # Data (beyond the common keys).
    use_cache: bool = True  # False = recompute the backbone on images every step
    nns_dir: str = ""  # "" = beside the feature cache: <cache_dir>/../nns

    # Head.
    code_dim: int = 70
    dropout: float = 0.1
    nonlinear: bool = True

    # Correspondence loss.
    lambda_self: float = 0.67
    lambda_knn: float = 0.25
    lambda_rand: float = 0.63
    shift_self: float = 0.18
    shift_knn: float = 0.12
    shift_rand: float = 0.46
    feature_samples: int = 11
    neg_samples: int = 5
    knn_top: int = 7  # the partner is drawn uniformly from the 7 nearest neighbours (never the image itself)
    pointwise: bool = True
    zero_clamp: bool = True
    stabilize: bool = False

    # Optimisation: one Adam per part, no schedule.
    lr_head: float = 5e-4
    lr_linear: float = 5e-3
    lr_cluster: float = 5e-3
    batch_size: int = 16
    max_steps: int = 5000
    # The linear probe's loss upsamples its logits to the label size (224x224), which costs more than the rest of
    # a cached step on CPU (~0.9 of 1.25 s at batch 16). Stride 4 scores every 4th label pixel in each direction
    # (56x56, still 3.5x the 16x16 feature grid); the probe is a diagnostic that never moves the head. 1 = original.
    linear_label_stride: int = 4

    # Probes.
    n_extra_clusters: int = 0
    alpha: float = 2.0  # softmax temperature of the cluster probe at evaluation

    def loss_weights(self) -> CorrespondenceWeights:
        """The λ and b values as the loss function's argument."""
        return CorrespondenceWeights(
            lambda_self=self.lambda_self, lambda_knn=self.lambda_knn, lambda_rand=self.lambda_rand,
            shift_self=self.shift_self, shift_knn=self.shift_knn, shift_rand=self.shift_rand,
        )
