"""The keys every trainer shares. Each method's config is ``@dataclass class XConfig(RunConfig)`` adding its own
keys with the paper's values as defaults; `shared.config.parse_args` reads YAML and ``key=value`` into it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from shared.features import DEFAULT_DESCRIPTOR


@dataclass
class RunConfig:
    # The run: runs/<method>/<dataset>/<name>/ under output_root.
    name: str = "default"
    output_root: str = "runs"
    seed: int = 0
    deterministic: bool = False
    resume: str = ""  # "" | "auto" | path to a checkpoint
    overwrite: bool = False  # True: start afresh in a run directory that already holds checkpoints
    device: str = "auto"

    # Data: dataset splits and the resolutions of the training and validation views.
    data_root: str = ""  # "" -> $USS_DATA or ./data
    dataset: str = "cocostuff27"
    train_split: str = "train"
    val_split: str = "val"
    five_crop: bool = True
    resolution: int = 224  # training view (snapped to a multiple of the patch size)
    val_resolution: int = 320  # 322 for /14 backbones: the resolution `compare` evaluates at

    # Backbone and the features the head reads (see shared.features).
    backbone: str = "dinov2_vits14"
    backbone_weights: str = ""  # "" = official weights, "none" = random init, else a path
    features: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_DESCRIPTOR))
    force_float32: bool = False  # disable bf16 autocast in the backbone
    cache_dir: str = "cache/features"

    # Another method's export this one trains on ("" = none): a segmenter.pt2 path, a run directory, or
    # "run:<method>" for that method's run of the same output_root, dataset and name.
    base_segmenter: str = ""

    # Evaluation and export. The exported model is the last step's: choosing by validation mIoU uses labels,
    # which an unsupervised method does not have, so it is an explicit option recorded in the export.
    select_by: Literal["last", "val_miou"] = "last"
    extra_policy: Literal["error", "majority", "drop", "stego"] = "error"
    val_every: int = 100
    val_batch_size: int = 16
    crf_at_end: bool = True
    log_every: int = 10
    n_figure_images: int = 4
