"""The pieces of one SegUnify training step, apart from `train.py` so that tests can drive them on synthetic
features: the batch stream, kNN partners, the modules and optimisers, the learning-rate schedule, the step.

Everything random in a step is a function of (seed, rank, step): the batch indices, the kNN partner draw, and a
torch generator for the sampled positions and the random partners. A resumed run therefore repeats the
uninterrupted one exactly, with nothing but the weights, the optimisers and the global centres restored.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from segunify.centres import kmeans_directions
from segunify.config import SegUnifyConfig
from segunify.losses import correspondence_loss, labeler_loss
from segunify.model import Compressor, Labeler, SegUnifyEvalHead
from shared.dist import all_reduce_mean
from shared.probes import LinearProbe


class BatchStream:
    """This rank's batch indices at a given step: a seeded `DistributedSampler` order per epoch, cut in slices."""

    def __init__(self, n_items: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        if n_items < 2 * world_size:
            raise ValueError(f"the training split has {n_items} images; SegUnify needs at least 2 per process "
                             f"({world_size} processes) for random partners: use a larger train_split.")
        self.sampler = DistributedSampler(range(n_items), num_replicas=world_size, rank=rank, shuffle=True,
                                          seed=seed, drop_last=True)
        self.batch_size = max(2, min(batch_size, len(self.sampler)))
        self.steps_per_epoch = len(self.sampler) // self.batch_size
        self._epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    def batch(self, step: int) -> np.ndarray:
        """Indices (B,) of this rank's images at `step`."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._order = epoch, np.fromiter(iter(self.sampler), dtype=np.int64)
        return self._order[position * self.batch_size:(position + 1) * self.batch_size]


def draw_knn_partners(knn: np.ndarray, indices: np.ndarray, top: int, rng: np.random.Generator) -> np.ndarray:
    """One of the `top` nearest neighbours of each index (never the index itself): knn (N, k) self first -> (B,)."""
    partners = np.empty(len(indices), dtype=np.int64)
    for slot, index in enumerate(indices):
        candidates = knn[index][knn[index] != index][:top]
        if len(candidates) == 0:
            raise ValueError(f"the kNN row of image {index} lists only the image itself; delete the split's kNN file "
                             "under nns_dir so that it is recomputed.")
        partners[slot] = candidates[rng.integers(len(candidates))]
    return partners


def step_generator(seed: int, rank: int, step: int, device: torch.device | str) -> torch.Generator:
    """The torch generator of one step on one rank (positions, random partners)."""
    mixed = int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(mixed)


def build_modules(cfg: SegUnifyConfig, feature_dim: int, n_classes: int) -> nn.ModuleDict:
    """Compressor, labeler and the linear probe (a diagnostic) in one container, so a checkpoint holds all."""
    return nn.ModuleDict({
        "compressor": Compressor(feature_dim, cfg.code_dim, nonlinear=cfg.nonlinear),
        "labeler": Labeler(cfg.code_dim, n_classes + cfg.n_extra_clusters, n_sets=cfg.n_local_sets, ema=cfg.ema),
        "linear_probe": LinearProbe(cfg.code_dim, n_classes),
    })


@torch.no_grad()
def start_centres(modules: nn.ModuleDict, feats: torch.Tensor, cfg: SegUnifyConfig) -> None:
    """Before the first step: point the labeler's centres along cosine k-means of the code of `feats` (B, C, h, w).

    The code is that of a training-mode forward (batch statistics, as the first step will see), on a copy of the
    compressor so that its running statistics are left alone. The same features give the same centres on every rank.
    """
    compressor = copy.deepcopy(modules["compressor"]).train()
    code = compressor(feats)  # (B, D, h, w)
    tokens = code.permute(0, 2, 3, 1).reshape(-1, code.shape[1])
    generator = torch.Generator(device=tokens.device).manual_seed(cfg.seed)
    labeler = modules["labeler"]
    labeler.start_at(kmeans_directions(tokens, labeler.n_clusters, iters=cfg.centre_init_iters, generator=generator))


def build_optimizers(cfg: SegUnifyConfig, modules: nn.ModuleDict) -> dict[str, torch.optim.Optimizer]:
    return {"compressor": torch.optim.Adam(modules["compressor"].parameters(), lr=cfg.lr_compressor),
            "labeler": torch.optim.Adam(modules["labeler"].parameters(), lr=cfg.lr_labeler),
            "linear_probe": torch.optim.Adam(modules["linear_probe"].parameters(), lr=cfg.lr_linear)}


def schedule_factor(cfg: SegUnifyConfig, step: int) -> float:
    """Learning-rate multiplier at `step`: 1, or (1 - t/T)^p with t = step mod T (polynomial with warm restarts)."""
    if cfg.lr_schedule == "constant":
        return 1.0
    cycle = cfg.restart_every or cfg.max_steps
    return (1.0 - (step % cycle) / cycle) ** cfg.poly_power


def set_learning_rates(cfg: SegUnifyConfig, optimizers: dict[str, torch.optim.Optimizer], step: int) -> None:
    """The compressor and the labeler follow the schedule; the linear probe keeps its rate."""
    factor = schedule_factor(cfg, step)
    for name, base in (("compressor", cfg.lr_compressor), ("labeler", cfg.lr_labeler)):
        for group in optimizers[name].param_groups:
            group["lr"] = base * factor


def step_losses(modules: nn.ModuleDict, compressor: nn.Module, feats: torch.Tensor, feats_knn: torch.Tensor,
                labels: torch.Tensor | None, cfg: SegUnifyConfig,
                generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one step; `compressor` is the (possibly DDP-wrapped) compressor.

    feats, feats_knn: (B, C, h, w) features of the images and their kNN partners; labels (B, H, W) with -1 =
    ignore, or None (the linear probe is skipped). One compressor call on both, so batch norm sees one batch.
    """
    batch = feats.shape[0]
    code_all = compressor(torch.cat([feats, feats_knn]))
    code, code_knn = code_all[:batch], code_all[batch:]
    corr, parts = correspondence_loss(feats, feats_knn, code, code_knn, cfg.partner_terms(),
                                      n_samples=cfg.feature_samples, n_random=cfg.random_partners,
                                      generator=generator)
    labeler = modules["labeler"]
    labeler_code = code if cfg.labeler_trains_compressor else code.detach()
    label_loss, label_parts = labeler_loss(labeler.local_scores(labeler_code), labeler.global_scores(labeler_code),
                                           temperature=cfg.temperature, energy_weight=cfg.energy_weight)
    linear_loss = feats.new_zeros(())
    if labels is not None:
        stride = max(1, cfg.linear_label_stride)
        probe = modules["linear_probe"]
        linear_loss = probe.loss(probe(code.detach()), labels[:, ::stride, ::stride])
    total = corr + label_loss + linear_loss
    logs = {"loss/total": total.detach(), "loss/correspondence": corr.detach(), "loss/labeler": label_loss.detach(),
            "loss/linear": linear_loss.detach(), **{f"loss/{k}": v for k, v in {**parts, **label_parts}.items()}}
    return total, logs


def apply_gradients(total: torch.Tensor, modules: nn.ModuleDict, optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Backward, one step of every optimiser, then the EMA move of the global centres.

    The compressor's gradients are averaged by DDP; the labeler and the probe are not wrapped, so theirs are
    averaged here (a no-op in one process), which keeps their weights and the global centres equal on all ranks.
    """
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    total.backward()
    for name in ("labeler", "linear_probe"):
        for param in modules[name].parameters():
            if param.grad is not None:
                all_reduce_mean(param.grad)
    for optimizer in optimizers.values():
        optimizer.step()
    modules["labeler"].update_global()


def eval_head(modules: nn.ModuleDict, alpha: float) -> SegUnifyEvalHead:
    """features (B, C, h, w) -> {code, cluster_logits, linear_logits}; call `.eval()` on it before use."""
    return SegUnifyEvalHead(modules["compressor"], modules["labeler"], modules["linear_probe"], alpha)
