"""STEGO configuration: a typed dataclass whose defaults are the paper's ("default config" row of the spec)."""

from __future__ import annotations

from dataclasses import dataclass

from stego.losses import CorrespondenceWeights


@dataclass
class StegoConfig:
    # Common trainer fields.
    name: str = "default"
    output_root: str = "runs"
    seed: int = 0
    deterministic: bool = False
    resume: str = ""  # "" | "auto" | path to a checkpoint
    device: str = "auto"
    data_root: str = ""  # "" -> $USS_DATA or ./data

    # Data and backbone.
    dataset: str = "cocostuff27"
    train_split: str = "train"
    val_split: str = "val"
    five_crop: bool = True  # train on the five-crop set, as the paper does
    resolution: int = 224  # training view
    val_resolution: int = 320  # rounded to a multiple of the patch size (322 for /14 backbones)
    backbone: str = "dinov2_vits14"
    backbone_weights: str = ""  # "" = official weights, "none" = random init, else a path
    feature_layer: int = -1
    force_float32: bool = False  # disable bf16 autocast in the backbone
    use_cache: bool = True  # False = recompute the backbone on images every step
    cache_dir: str = "cache/features"
    nns_dir: str = "cache/nns"

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

    # Probes and evaluation.
    n_extra_clusters: int = 0
    extra_policy: str = "error"  # "error" | "majority" | "drop" | "stego" (the original's: drop extra-cluster pixels)
    alpha: float = 2.0  # softmax temperature of the cluster probe at evaluation
    val_every: int = 100
    val_batch_size: int = 16
    crf_at_end: bool = True
    log_every: int = 10
    n_figure_images: int = 4

    def loss_weights(self) -> CorrespondenceWeights:
        """The λ and b values as the loss function's argument."""
        return CorrespondenceWeights(
            lambda_self=self.lambda_self, lambda_knn=self.lambda_knn, lambda_rand=self.lambda_rand,
            shift_self=self.shift_self, shift_knn=self.shift_knn, shift_rand=self.shift_rand,
        )
