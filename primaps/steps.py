"""The pieces of a PriMaPs-EM run that tests drive without the run-directory plumbing: the schedule, batches as a
function of (seed, rank, step), the PCA initialisation, one warm-up step and one EM step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from primaps.config import PrimapsConfig
from primaps.losses import ema_decay, ema_update_, focal_cross_entropy, hard_cosine_kmeans_loss, majority_vote
from primaps.model import CosinePrototypes, PrimapsEvalHead, upsample
from shared.probes import LinearProbe


@dataclass(frozen=True)
class Schedule:
    """Steps per epoch (drop_last, per rank), warm-up steps and the run's total."""

    steps_per_epoch: int
    warmup_steps: int
    total_steps: int

    @classmethod
    def of(cls, cfg: PrimapsConfig, n_images: int, world_size: int = 1) -> Schedule:
        per_rank = n_images // world_size
        batch = min(cfg.batch_size, per_rank)
        if batch < 1:
            raise ValueError(f"the training split has {n_images} images for {world_size} processes; PriMaPs needs at "
                             "least one per process.")
        spe = per_rank // batch
        warmup = cfg.warmup_steps if cfg.warmup_steps > -1 else cfg.warmup_epochs * spe
        total = warmup + cfg.em_epochs * spe
        return cls(spe, warmup, min(total, cfg.max_steps) if cfg.max_steps > -1 else total)


def batch_indices(step: int, n_images: int, batch_size: int, *, seed: int, rank: int = 0,
                  world_size: int = 1) -> np.ndarray:
    """Indices (B,) of `step` on `rank`: each epoch one seeded permutation, split across ranks, drop_last."""
    per_rank = n_images // world_size
    batch = min(batch_size, per_rank)
    epoch, position = divmod(step, per_rank // batch)
    order = np.random.default_rng([seed, epoch]).permutation(n_images)[rank::world_size][:per_rank]
    return np.sort(order[position * batch:(position + 1) * batch])


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The step's own random stream (flips, augmentations): resuming repeats it exactly."""
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, rank, step]).integers(2**62)))


def build_modules(dim: int, n_classes: int) -> nn.ModuleDict:
    """θ_M (momentum prototypes), θ_R (trained prototypes) and the linear probe (a diagnostic)."""
    return nn.ModuleDict({"theta_m": CosinePrototypes(dim, n_classes), "theta_r": CosinePrototypes(dim, n_classes),
                          "linear_probe": LinearProbe(dim, n_classes)})


def build_optimizers(cfg: PrimapsConfig, modules: nn.ModuleDict) -> dict[str, torch.optim.Optimizer]:
    return {"theta_m": torch.optim.Adam(modules["theta_m"].parameters(), lr=cfg.lr_prototypes),
            "theta_r": torch.optim.Adam(modules["theta_r"].parameters(), lr=cfg.lr_prototypes),
            "linear_probe": torch.optim.Adam(modules["linear_probe"].parameters(), lr=cfg.lr_linear)}


def pca_directions(vectors: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k principal directions (k, C) of vectors (N, C) (centred covariance, float64, exact).

    Each is oriented towards the sum of the L2-normalised vectors (the sign rule of the mask proposals); the
    original's `pca_lowrank` leaves it to chance, and for a cosine prototype -v is another prototype.
    """
    x = vectors.double()
    centred = x - x.mean(dim=0, keepdim=True)
    _, eigvecs = torch.linalg.eigh(centred.T @ centred)
    top = eigvecs[:, -k:].flip(1).T  # (k, C), largest eigenvalue first
    signs = torch.sign(top @ torch.nn.functional.normalize(x, dim=1).sum(dim=0))
    return (top * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]).float()


def pca_init_(modules: nn.ModuleDict, vectors: torch.Tensor) -> None:
    """Both prototype sets <- the top K principal directions of vectors (N, D) (the first K of the original's 2K).

    A code of fewer than K dimensions (a small base segmenter) has only D directions: the missing prototypes are
    the opposite ends of the leading axes (-v_1, -v_2, ...), so the K prototypes stay distinct and deterministic.
    """
    k = modules["theta_m"].weight.shape[0]
    if vectors.shape[0] < 2:
        raise ValueError(f"the PCA initialisation needs at least 2 feature vectors, got {vectors.shape[0]}.")
    directions = pca_directions(vectors, min(k, vectors.shape[1]))
    while directions.shape[0] < k:
        directions = torch.cat([directions, -directions[: k - directions.shape[0]]])
    with torch.no_grad():
        modules["theta_m"].weight.copy_(directions)
        modules["theta_r"].weight.copy_(directions)


def linear_loss(modules: nn.ModuleDict, code: torch.Tensor, labels: torch.Tensor | None, stride: int) -> torch.Tensor:
    if labels is None:
        return torch.zeros((), device=code.device)
    probe = modules["linear_probe"]
    return probe.loss(probe(code.detach()), labels[:, stride // 2::stride, stride // 2::stride])


def warmup_step(modules: nn.ModuleDict, code: torch.Tensor, labels: torch.Tensor | None,
                cfg: PrimapsConfig) -> tuple[torch.Tensor, dict]:
    """Hard cosine k-means on θ_M at the feature grid (as the original's "baseline" stage) + the linear probe."""
    kmeans = hard_cosine_kmeans_loss(modules["theta_m"](code.detach()))
    linear = linear_loss(modules, code, labels, cfg.label_stride)
    return kmeans + linear, {"loss/kmeans": kmeans.detach(), "loss/linear": linear.detach()}


def em_step(modules: nn.ModuleDict, code: torch.Tensor, code_student: torch.Tensor, masks: torch.Tensor,
            labels: torch.Tensor | None, cfg: PrimapsConfig) -> tuple[torch.Tensor, dict]:
    """E-step (majority vote of θ_M inside each pseudo-mask) and M-step (focal CE of θ_R on the second view).

    code, code_student (B, D, h, w); masks (B, R, R) int64 (0 = background); both heads read the code bilinearly
    upsampled to the masks' grid (every `label_stride`-th pixel), or with `upsample_features=false` their cosines
    are upsampled instead.
    """
    stride = cfg.label_stride
    masks = masks[:, stride // 2::stride, stride // 2::stride]
    size = tuple(masks.shape[-2:])
    n_classes = modules["theta_m"].weight.shape[0]
    def head(name: str, x: torch.Tensor) -> torch.Tensor:
        if cfg.upsample_features:
            return modules[name](upsample(x, size))
        return upsample(modules[name](x), size)

    with torch.no_grad():
        predictions = head("theta_m", code).argmax(dim=1)
        targets = majority_vote(predictions, masks, n_classes)
    focal = focal_cross_entropy(head("theta_r", code_student.detach()), targets, cfg.focal_gamma)
    linear = linear_loss(modules, code, labels, stride)
    assigned = (targets >= 0).float().mean()
    return focal + linear, {"loss/focal": focal.detach(), "loss/linear": linear.detach(),
                            "pseudo/assigned": assigned}


def start_em_(modules: nn.ModuleDict) -> None:
    """θ_R <- θ_M when the EM begins (the original starts its EM from the warm-up's cluster probe)."""
    with torch.no_grad():
        modules["theta_r"].weight.copy_(modules["theta_m"].weight)


def maybe_ema_(modules: nn.ModuleDict, em_steps_done: int, cfg: PrimapsConfig) -> float | None:
    """After the `em_steps_done`-th EM step: θ_M <- EMA(θ_R) every `ema_every` steps; returns the decay used."""
    if em_steps_done <= 0 or em_steps_done % cfg.ema_every:
        return None
    decay = ema_decay(em_steps_done // cfg.ema_every, cfg.ema_decay, cfg.ema_warmup)
    ema_update_(modules["theta_m"], modules["theta_r"], decay)
    return decay


def eval_head(modules: nn.ModuleDict, alpha: float, base: nn.Module | None, which: str = "theta_m") -> PrimapsEvalHead:
    """The module that is validated and exported (θ_M by default; `which="theta_r"` for the diagnostic)."""
    return PrimapsEvalHead(modules[which], modules["linear_probe"], alpha, base)
