"""Seeding and determinism switches for a run.

``seed_everything(seed, deterministic)`` seeds python's ``random``, numpy's global RNG and torch (CPU and
every CUDA device). With ``deterministic=True`` it also asks torch for deterministic kernels
(``use_deterministic_algorithms(True, warn_only=True)``: an op without a deterministic implementation warns
instead of failing), turns off cuDNN autotuning and sets ``CUBLAS_WORKSPACE_CONFIG`` as CUDA requires.
Under DDP call it with the same seed on every rank before building the model, so all ranks start from the
same weights; offset the seed by the rank yourself where ranks need different random streams.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["seed_everything"]


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch with ``seed`` and set the determinism flags (see module docstring)."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}.")
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy only accepts 32-bit seeds
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        # cuBLAS needs this workspace setting for reproducible matmuls; it must be set before the first CUDA call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
