"""PriMaPs-EM configuration: the common run keys plus the method's own, with the paper's values as defaults
(the official `experiments.sh`: DINO ViT-S/8 there, DINOv2 ViT-S/14 here; 320 px, batch 32, 2 + 50 epochs)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.config_ranges import non_negative, positive, probability, ranged, resume_may_differ
from shared.run_config import RunConfig


@dataclass
class PrimapsConfig(RunConfig):
    # Views: pseudo-masks and training at 320 px (snapped to 322 for /14 backbones), whole images.
    five_crop: bool = False
    resolution: int = 320
    val_resolution: int = 320

    # Mask proposals and pseudo-masks (computed once per training image, cached beside the feature cache).
    threshold: float = probability(0.4)
    coverage: float = ranged(0.95, 0, 1, low_open=True)
    patience: int = ranged(3, 1)  # stop when the assigned set is unchanged over this many iterations
    gain: float = positive(10.0)
    pseudo_dir: str = resume_may_differ("")  # "" = <cache_dir>/../primaps beside the feature cache
    pseudo_workers: int = ranged(0, 0)  # 0 = every available core
    pseudo_timeout_s: float = positive(300.0)  # one image's deadline in the pool; a miss is an error, never a hang

    # EM.
    pca_batches: int = ranged(93, 1)  # the original stops after 92 + 1 batches of features for the PCA initialisation
    warmup_epochs: int = ranged(2, 0)  # hard cosine k-means on θ_M before the EM
    em_epochs: int = ranged(50, 0)
    warmup_steps: int = ranged(-1, -1)  # > -1 overrides warmup_epochs (in steps)
    max_steps: int = ranged(-1, -1)  # > -1 caps the whole run (warm-up + EM) at this many steps
    batch_size: int = ranged(32, 1)
    lr_prototypes: float = positive(5e-3)  # θ_M during the warm-up, θ_R during the EM (Adam)
    lr_linear: float = positive(5e-3)
    focal_gamma: float = non_negative(2.0)
    ema_decay: float = probability(0.98)
    ema_every: int = ranged(10, 1)
    ema_warmup: bool = True  # the original's EMA ramps the decay up over its first updates (see losses.ema_decay)
    hflip: bool = True  # the original's RandomHFlip (image, label and pseudo-mask together)
    # The second view of the M-step: the original's "student" augmentations (Gaussian blur, then colour jitter or
    # grayscale) of the first view, through the live backbone. False trains θ_R on the first view's cached features.
    student_augs: bool = True
    # The photometric augmentations the original meant to add to both views but dropped (`train_transforms + [...]`
    # without assignment). Off for parity with the published numbers; on needs the live backbone for both views.
    photometric_augs: bool = False
    # True (original): θ_M and θ_R read the code bilinearly upsampled to the mask grid. False: they read the code at
    # the feature grid and their cosines are upsampled (K instead of D channels: ~D/K times cheaper on CPU).
    upsample_features: bool = True
    label_stride: int = ranged(1, 1)  # E- and M-step on every label_stride-th pixel of the R x R view (1 = original)

    # Export.
    alpha: float = positive(10.0)  # cluster_logits = alpha * cosine (cosines live in [-1, 1])
