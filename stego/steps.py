"""The pieces of one STEGO training step: the index stream, kNN partners, the step itself.

Kept apart from `train.py` so that tests can drive a tiny training run on fake cached features without the
run-directory plumbing.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from shared.dist import all_reduce_mean
from shared.probes import ClusterProbe, LinearProbe
from stego.config import StegoConfig
from stego.losses import correspondence_loss
from stego.model import StegoEvalHead, StegoHead
from stego.rank_streams import RankStreams

# A micro-batch's (feats, feats_knn, labels): see `step_losses`.
MicroBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


class IndexStream:
    """Per-rank batch indices as a function of the step, so a resumed run sees the same batches.

    A `DistributedSampler` (shuffled, seeded, `set_epoch` per epoch) splits each epoch's permutation across
    ranks; a step reads one slice of `batch_size` indices of its rank's share. With micro-batches, `rank` and
    `world_size` are the virtual rank and the number of virtual ranks (processes x micro_batches).
    """

    def __init__(self, n_items: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        if n_items < 2 * world_size:
            raise ValueError(f"the training split has {n_items} images but STEGO needs at least 2 per process and "
                             f"micro-batch ({world_size} in all) to draw negative pairs; use a larger train_split, "
                             "fewer processes or fewer micro_batches.")
        self.sampler = DistributedSampler(range(n_items), num_replicas=world_size, rank=rank, shuffle=True,
                                          seed=seed, drop_last=True)
        self.batch_size = min(batch_size, len(self.sampler))
        self.steps_per_epoch = len(self.sampler) // self.batch_size
        self._epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    def batch(self, step: int) -> np.ndarray:
        """Indices (B,) of the images of `step` on this rank."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._order = epoch, np.fromiter(iter(self.sampler), dtype=np.int64)
        return self._order[position * self.batch_size:(position + 1) * self.batch_size]


def knn_partners(knn: np.ndarray, indices: np.ndarray, top: int, rng: np.random.Generator) -> np.ndarray:
    """For each index, one of its `top` nearest neighbours drawn uniformly, never the image itself.

    knn: (N, K) neighbour indices, self first. Returns (B,) int64.
    """
    partners = np.empty(len(indices), dtype=np.int64)
    for n, index in enumerate(indices):
        row = knn[index]
        candidates = row[row != index][:top]  # robust to ties that move `index` away from column 0
        if len(candidates) == 0:
            raise ValueError(f"kNN row {index} lists no neighbour other than the image itself; delete the split's kNN "
                             "file under nns_dir so that it is recomputed.")
        partners[n] = candidates[rng.integers(len(candidates))]
    return partners


def build_modules(cfg: StegoConfig, feature_dim: int, n_classes: int) -> nn.ModuleDict:
    """Head plus the two probes, in one container so a checkpoint holds all three."""
    return nn.ModuleDict({
        "head": StegoHead(feature_dim, cfg.code_dim, dropout=cfg.dropout, nonlinear=cfg.nonlinear),
        "linear_probe": LinearProbe(cfg.code_dim, n_classes),
        "cluster_probe": ClusterProbe(cfg.code_dim, n_classes, n_extra=cfg.n_extra_clusters),
    })


def build_optimizers(cfg: StegoConfig, modules: nn.ModuleDict) -> dict[str, torch.optim.Optimizer]:
    """One Adam per part (head 5e-4, probes 5e-3 in the paper), no schedule."""
    return {
        "head": torch.optim.Adam(modules["head"].parameters(), lr=cfg.lr_head),
        "linear_probe": torch.optim.Adam(modules["linear_probe"].parameters(), lr=cfg.lr_linear),
        "cluster_probe": torch.optim.Adam(modules["cluster_probe"].parameters(), lr=cfg.lr_cluster),
    }


def step_losses(modules: nn.ModuleDict, head: nn.Module, feats: torch.Tensor, feats_knn: torch.Tensor,
                labels: torch.Tensor | None, cfg: StegoConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one step. `head` is the (possibly DDP-wrapped) head.

    feats, feats_knn: (B, C, h, w) backbone features of the images and their kNN partners;
    labels: (B, H, W) with -1 = ignore, or None when the split has none (the linear probe is then skipped).
    """
    batch = feats.shape[0]
    signal_all, code_all = head(torch.cat([feats, feats_knn]))  # one forward: DDP sees a single call
    signal, signal_knn = signal_all[:batch], signal_all[batch:]
    code, code_knn = code_all[:batch], code_all[batch:]
    corr, terms = correspondence_loss(
        signal, signal_knn, code, code_knn, cfg.loss_weights(), feature_samples=cfg.feature_samples,
        neg_samples=cfg.neg_samples, pointwise=cfg.pointwise, zero_clamp=cfg.zero_clamp, stabilize=cfg.stabilize)

    detached = code.detach()  # the probes never move the head
    cluster_loss, _ = modules["cluster_probe"](detached, None)
    linear_loss = torch.zeros((), device=feats.device)
    if labels is not None:
        if cfg.linear_label_stride > 1:  # nearest subsampling: a cheaper probe loss, same label distribution
            labels = labels[:, ::cfg.linear_label_stride, ::cfg.linear_label_stride]
        linear_probe = modules["linear_probe"]
        linear_loss = linear_probe.loss(linear_probe(detached), labels)
    total = corr + linear_loss + cluster_loss
    logs = {"loss/total": total.detach(), "loss/correspondence": corr.detach(), "loss/linear": linear_loss.detach(),
            "loss/cluster": cluster_loss.detach(), "loss/self": terms["self"], "loss/knn": terms["knn"],
            "loss/rand": terms["rand"]}
    return total, logs


def apply_gradients(total: torch.Tensor, modules: nn.ModuleDict, optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Backward and one step of every optimizer (one batch; `accumulate_gradients` is the micro-batch case).

    The head's gradients are averaged by DDP; the probes are not wrapped, so their gradients are averaged over
    the ranks here (a no-op in a single process).
    """
    _zero_gradients(optimizers)
    total.backward()
    step_optimizers(modules, optimizers)


def accumulate_gradients(modules: nn.ModuleDict, head: nn.Module, optimizers: dict[str, torch.optim.Optimizer],
                         load_micro_batch: Callable[[int], MicroBatch], cfg: StegoConfig,
                         streams: RankStreams) -> dict[str, torch.Tensor]:
    """The gradients of one step over this process's `streams.count` micro-batches (its virtual ranks).

    `load_micro_batch(m)` returns micro-batch m; it and m's forward and backward run on m's random stream. Each
    loss is scaled by 1/M and the gradients accumulate, which is the average a data-parallel job of that many
    more ranks takes (under DDP the head's gradients are all-reduced by the last backward only: `no_sync` before
    it). `step_optimizers` then applies them. Returns the losses averaged over the micro-batches.
    """
    count = streams.count
    _zero_gradients(optimizers)
    sums: dict[str, torch.Tensor] = {}
    for m in range(count):
        last = m == count - 1
        sync = head.no_sync() if isinstance(head, DistributedDataParallel) and not last else nullcontext()
        with streams.use(m), sync:
            feats, feats_knn, labels = load_micro_batch(m)
            total, logs = step_losses(modules, head, feats, feats_knn, labels, cfg)
            (total / count).backward()
        sums = logs if m == 0 else {key: sums[key] + value for key, value in logs.items()}
    return {key: value / count for key, value in sums.items()}


def _zero_gradients(optimizers: dict[str, torch.optim.Optimizer]) -> None:
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)


def step_optimizers(modules: nn.ModuleDict, optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Average the probes' gradients over the processes (they are not DDP-wrapped), then step every optimizer."""
    for name in ("linear_probe", "cluster_probe"):
        for param in modules[name].parameters():
            if param.grad is not None:
                all_reduce_mean(param.grad)
    for optimizer in optimizers.values():
        optimizer.step()


def eval_head(modules: nn.ModuleDict, alpha: float) -> StegoEvalHead:
    """`features (B, C, h, w) -> {code, cluster_logits, linear_logits}`, the module that is validated and
    exported (call `.eval()` on it: dropout off)."""
    return StegoEvalHead(modules["head"], modules["cluster_probe"], modules["linear_probe"], alpha)
