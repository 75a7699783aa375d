"""The planted-class synthetic benchmark the STEGO tests use (tests/stego/stego_synthetic.py), and the cosine k-means
baseline's mIoU on it, for the SegUnify and spectral-baseline tests to compare against.

It sits in tests/ (on sys.path through tests/conftest.py's folder); the STEGO helper is loaded by its path. Tests
are not methods, so sharing a test helper does not break the rule that methods never import each other.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from baselines.kmeans.kmeans import cosine_kmeans
from shared.metrics import segmentation_scores

_HELPER = Path(__file__).resolve().parent / "stego" / "stego_synthetic.py"


def stego_synthetic():
    """The module tests/stego/stego_synthetic.py (make_synthetic, knn_of)."""
    if "stego_synthetic" not in sys.modules:
        spec = importlib.util.spec_from_file_location("stego_synthetic", _HELPER)
        module = importlib.util.module_from_spec(spec)
        sys.modules["stego_synthetic"] = module  # before running it: its dataclass looks its module up there
        spec.loader.exec_module(module)
    return sys.modules["stego_synthetic"]


def miou_of_logits(logits: torch.Tensor, labels: np.ndarray, n_classes: int) -> float:
    """Hungarian mIoU of token logits (N, K, h, w) upsampled bilinearly to the labels (N, R, R)."""
    pred = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
    return segmentation_scores(pred, torch.from_numpy(labels.astype(np.int64)), n_classes)["miou"]


def kmeans_miou(data, n_classes: int, seed: int = 0) -> float:
    """The k-means baseline on the planted features: cosine k-means of every token, 5 seeded restarts."""
    feats = torch.from_numpy(data.features.astype(np.float32))  # (N, C, h, w)
    result = cosine_kmeans(feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]), n_classes, n_init=5, seed=seed)
    assignment = result.labels.reshape(feats.shape[0], *feats.shape[2:])
    return miou_of_logits(F.one_hot(assignment, n_classes).permute(0, 3, 1, 2), data.labels, n_classes)
