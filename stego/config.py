"""STEGO configuration: a typed dataclass whose defaults are the paper's ("default config" row of the spec)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.config_ranges import non_negative, positive, ranged, resume_may_differ
from shared.run_config import RunConfig
from stego.losses import CorrespondenceWeights


@dataclass
class StegoConfig(RunConfig):
    # Data (beyond the common keys).
    use_cache: bool = True  # False = recompute the backbone on images every step
    nns_dir: str = resume_may_differ("")  # "" = beside the feature cache: <cache_dir>/../nns

    # Head.
    code_dim: int = ranged(70, 1)
    dropout: float = ranged(0.1, 0, 1, high_open=True)  # 1 would zero every activation
    nonlinear: bool = True

    # Correspondence loss.
    lambda_self: float = non_negative(0.67)
    lambda_knn: float = non_negative(0.25)
    lambda_rand: float = non_negative(0.63)
    shift_self: float = 0.18
    shift_knn: float = 0.12
    shift_rand: float = 0.46
    feature_samples: int = ranged(11, 1)
    neg_samples: int = ranged(5, 1)
    # The partner is drawn uniformly from the 7 nearest neighbours (never the image itself); the kNN file holds 30
    # entries, the image itself first, so at most 29 can be drawn from.
    knn_top: int = ranged(7, 1, 29)
    pointwise: bool = True
    zero_clamp: bool = True
    stabilize: bool = False

    # Optimisation: one Adam per part, no schedule.
    lr_head: float = positive(5e-4)
    lr_linear: float = positive(5e-3)
    lr_cluster: float = positive(5e-3)
    batch_size: int = ranged(16, 1)  # per process and micro-batch
    # Gradient accumulation over M micro-batches of batch_size, each a "virtual rank" with its own index shard, kNN
    # draws and dropout/grid stream: W processes with micro_batches=M train exactly what a W·M-rank job does. It
    # exists to reproduce a multi-GPU run on one device, or to fit a larger effective batch (correspondence
    # negatives stay within each micro-batch, as within each rank). Not in the original code. 1 = no accumulation.
    micro_batches: int = ranged(1, 1)
    max_steps: int = ranged(5000, 1)
    # The linear probe's loss upsamples its logits to the label size (224x224), which costs more than the rest of
    # a cached step on CPU (~0.9 of 1.25 s at batch 16). Stride 4 scores every 4th label pixel in each direction
    # (56x56, still 3.5x the 16x16 feature grid); the probe is a diagnostic that never moves the head. 1 = original.
    linear_label_stride: int = ranged(4, 1)

    # Probes.
    n_extra_clusters: int = ranged(0, 0)
    alpha: float = positive(2.0)  # softmax temperature of the cluster probe at evaluation

    def loss_weights(self) -> CorrespondenceWeights:
        """The λ and b values as the loss function's argument."""
        return CorrespondenceWeights(
            lambda_self=self.lambda_self, lambda_knn=self.lambda_knn, lambda_rand=self.lambda_rand,
            shift_self=self.shift_self, shift_knn=self.shift_knn, shift_rand=self.shift_rand,
        )
