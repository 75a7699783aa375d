"""The keys every trainer shares. Each method's config is ``@dataclass class XConfig(RunConfig)`` adding its own
keys with the paper's values as defaults; `shared.config.parse_args` reads YAML and ``key=value`` into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from shared.config_ranges import DEVICE, PATH_NAME, Rule, check_config, checked, non_empty, ranged
from shared.features import DEFAULT_DESCRIPTOR, canonical_descriptor

# A malformed descriptor is refused when the config is read (before the run directory is made); the test raises
# DescriptorError (a ValueError) saying what is wrong.
DESCRIPTOR = Rule("a feature descriptor such as {kind: tokens, layer: -1}", lambda v: bool(canonical_descriptor(v)),
                  good=(DEFAULT_DESCRIPTOR,), bad=({"kind": "foo"},))


@dataclass
class RunConfig:
    # The run: runs/<method>/<dataset>/<name>/ under output_root.
    name: str = checked("default", PATH_NAME)
    output_root: str = non_empty("runs")
    seed: int = ranged(0, 0, 2**32 - 1)  # numpy draws take seeds in [0, 2**32)
    deterministic: bool = False
    resume: str = ""  # "" | "auto" | path to a checkpoint
    overwrite: bool = False  # True: start afresh in a run directory that already holds checkpoints
    device: str = checked("auto", DEVICE)

    # Data: dataset splits and the resolutions of the training and validation views.
    data_root: str = ""  # "" -> $USS_DATA or ./data
    dataset: str = non_empty("cocostuff27")
    train_split: str = non_empty("train")
    val_split: str = non_empty("val")
    five_crop: bool = True
    resolution: int = ranged(224, 8)  # training view (snapped to a multiple of the patch size)
    val_resolution: int = ranged(320, 8)  # 322 for /14 backbones: the resolution `compare` evaluates at

    # Backbone and the features the head reads (see shared.features).
    backbone: str = non_empty("dinov2_vits14")
    backbone_weights: str = ""  # "" = official weights, "none" = random init, else a path
    features: dict[str, Any] = checked(dict(DEFAULT_DESCRIPTOR), DESCRIPTOR)
    force_float32: bool = False  # disable bf16 autocast in the backbone
    cache_dir: str = non_empty("cache/features")
    # Opening a feature cache always checks its sizes and a digest of sampled blocks; true also hashes every byte
    # against the digest recorded at build time (a full read of the cache; a cache that fails is rebuilt).
    verify_cache: bool = False

    # Another method's export this one trains on ("" = none): a segmenter.pt2 path, a run directory, or
    # "run:<method>" for that method's run of the same output_root, dataset and name.
    base_segmenter: str = ""

    # Evaluation and export. The exported model is the last step's: choosing by validation mIoU uses labels,
    # which an unsupervised method does not have, so it is an explicit option recorded in the export.
    select_by: Literal["last", "val_miou"] = "last"
    extra_policy: Literal["error", "majority", "drop", "stego"] = "error"
    val_every: int = ranged(100, 1)
    val_batch_size: int = ranged(16, 1)
    crf_at_end: bool = True
    log_every: int = ranged(10, 1)
    n_figure_images: int = ranged(4, 0)

    def __post_init__(self) -> None:
        # Configs built in code (tests, notebooks) are range-checked like those load_config builds.
        check_config(self)
