"""The pieces of one PU-SegNet training step, apart from the run-directory plumbing of `train.py`, so that tests
and the synthetic benchmark drive training on plain tensors.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pusegnet.config import PusegnetConfig
from pusegnet.losses import confidence_weighted_ce, gather_pixels, pair_similarity_loss, sample_positions
from pusegnet.model import PusegnetEvalHead, PusegnetHead
from shared.dist import all_reduce_mean, all_reduce_sum, get_world_size
from shared.probes import LinearProbe


class IndexStream:
    """Per-rank batch indices as a function of the step: epoch e is the permutation drawn from (seed, e), split
    across ranks by stride, so a resumed run reads the same batches as an uninterrupted one."""

    def __init__(self, n_items: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        per_rank = n_items // world_size
        if per_rank < 1:
            raise ValueError(f"the training split has {n_items} images for {world_size} processes; use fewer "
                             "processes or a larger train_split.")
        self.n_items, self.rank, self.world_size, self.seed = n_items, rank, world_size, seed
        self.batch_size = min(batch_size, per_rank)
        self.steps_per_epoch = per_rank // self.batch_size

    def batch(self, step: int) -> np.ndarray:
        """Indices (B,) of the images of ``step`` on this rank."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_items)[self.rank::self.world_size]
        return order[position * self.batch_size:(position + 1) * self.batch_size]


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """A torch generator that depends only on (seed, rank, step): the step's pixel samples."""
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, rank, step]).integers(2**62)))


def build_modules(cfg: PusegnetConfig, feature_dim: int, n_clusters: int, n_classes: int) -> nn.ModuleDict:
    """Head (+ the diagnostic linear probe on its detached code), in one container for checkpoints."""
    head = PusegnetHead(feature_dim, n_clusters, hidden_dim=cfg.hidden_dim, n_layers=cfg.n_layers,
                        dropout=cfg.dropout, sngp=cfg.sngp, spec_norm_bound=cfg.spec_norm_bound,
                        projection_dim=cfg.projection_dim, n_random_features=cfg.n_random_features,
                        lengthscale=cfg.gp_lengthscale, ridge=cfg.gp_ridge, precision_mode=cfg.precision_mode,
                        momentum=cfg.precision_momentum, seed=cfg.seed)
    modules = nn.ModuleDict({"head": head})
    if cfg.linear_probe:
        modules["linear_probe"] = LinearProbe(cfg.hidden_dim, n_classes)
    return modules


def build_optimizers(cfg: PusegnetConfig, modules: nn.ModuleDict) -> dict[str, torch.optim.Optimizer]:
    """Adam per part: head 5e-4, probe 5e-3 (the paper's values)."""
    optimizers = {"head": torch.optim.Adam(modules["head"].parameters(), lr=cfg.lr_head)}
    if "linear_probe" in modules:
        optimizers["linear_probe"] = torch.optim.Adam(modules["linear_probe"].parameters(), lr=cfg.lr_linear)
    return optimizers


def step_losses(modules: nn.ModuleDict, head: nn.Module, feats: torch.Tensor, pseudo: torch.Tensor,
                confidence: torch.Tensor, labels: torch.Tensor | None, cfg: PusegnetConfig,
                generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """Loss of one step and the head's outputs. ``head`` is the (possibly DDP-wrapped) head.

    feats (B, C, h, w); pseudo, confidence (B, h, w) from the base; labels (B, R, R) for the linear probe
    diagnostic only (None: skipped).
    """
    out = head(feats)
    ce = confidence_weighted_ce(out["logits"], pseudo, confidence)
    b, _, h, w = feats.shape
    positions = sample_positions(b, h, w, cfg.sim_samples, generator, feats.device)
    sim = pair_similarity_loss(feats, out["logits"], positions, cfg.shift, cfg.pointwise)
    total = ce + cfg.lambda_sim * sim
    linear = torch.zeros((), device=feats.device)
    if labels is not None and "linear_probe" in modules:
        if cfg.linear_label_stride > 1:
            labels = labels[:, ::cfg.linear_label_stride, ::cfg.linear_label_stride]
        probe = modules["linear_probe"]
        linear = probe.loss(probe(out["hidden"].detach()), labels)  # the probe never moves the head
    total = total + linear
    logs = {"loss/total": total.detach(), "loss/ce": ce.detach(), "loss/similarity": sim.detach(),
            "loss/linear": linear.detach()}
    return total, logs, out


def apply_gradients(total: torch.Tensor, modules: nn.ModuleDict, optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Backward and one step of every optimizer (the probe is not DDP-wrapped: its gradients are averaged here)."""
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    total.backward()
    if "linear_probe" in modules:
        for param in modules["linear_probe"].parameters():
            if param.grad is not None:
                all_reduce_mean(param.grad)
    for optimizer in optimizers.values():
        optimizer.step()


def precision_window_start(max_steps: int, steps_per_epoch: int) -> int:
    """First step of the last epoch: the exact precision sums the pixels of the steps from here on."""
    return max(0, max_steps - steps_per_epoch)


@torch.no_grad()
def update_precision(head: PusegnetHead, out: dict, cfg: PusegnetConfig, generator: torch.Generator) -> None:
    """Add a random subsample of the step's pixels to the Laplace precision (summed over ranks).

    Weight per pixel: p (1 - p) with p its maximum softmax probability ("logistic"), or 1 ("gaussian").
    """
    phi, logits = out["phi"].detach(), out["logits"].detach()
    b, _, h, w = phi.shape
    positions = sample_positions(b, h, w, cfg.precision_pixels, generator, phi.device)
    phi_s = gather_pixels(phi, positions).permute(0, 2, 1).reshape(-1, phi.shape[1])  # (B * P, R)
    if cfg.likelihood == "logistic":
        p = torch.softmax(gather_pixels(logits, positions), dim=1).amax(dim=1).reshape(-1)
        weight = p * (1.0 - p)
    else:
        weight = torch.ones(phi_s.shape[0], device=phi.device)
    term = all_reduce_sum(head.laplace.batch_term(phi_s, weight))
    head.laplace.update(term, phi_s.shape[0] * get_world_size())


def eval_head(modules: nn.ModuleDict, cfg: PusegnetConfig) -> PusegnetEvalHead:
    """The module that is validated and exported (call ``.eval()`` on it)."""
    return PusegnetEvalHead(modules["head"], modules["linear_probe"] if "linear_probe" in modules else None,
                            mean_field_factor=cfg.mean_field_factor, smooth_iterations=cfg.smooth_iterations,
                            smooth_percentile=cfg.smooth_percentile, smooth_window=cfg.smooth_window,
                            smooth_sigma=cfg.smooth_sigma, smooth_eps=cfg.smooth_eps)
