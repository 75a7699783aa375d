"""The pieces of one EAGLE training step: the index stream, the blurred view, the modules, the loss.

Kept apart from `train.py` so that tests can drive steps on hand-made tensors without the run-directory plumbing.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torch import nn
from torch.utils.data import DistributedSampler

from eagle.config import EagleConfig
from eagle.eicue import eigenvectors
from eagle.losses import correspondence_loss, object_centric_loss, schedule, token_weights
from eagle.model import EagleEvalHead, EagleHead, EigenClusterProbe, Projection
from shared.dist import all_reduce_mean
from shared.probes import ClusterProbe, LinearProbe
from shared.run_guard import check_finite

BLUR_KERNEL = 3


class IndexStream:
    """Per-rank batch indices as a function of the step (a seeded `DistributedSampler`, `set_epoch` per epoch),
    so a resumed run sees the same batches."""

    def __init__(self, n_items: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        if n_items < 2 * world_size:
            raise ValueError(f"the training split has {n_items} images but EAGLE needs at least 2 per process "
                             f"({world_size} processes) for its negative pairs; use a larger train_split.")
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


def blur_plan(cfg: EagleConfig, rank: int, step: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Which images of the step are blurred and with which σ: ((B,) bool, (B,) float), a function of
    (seed, rank, step) only, so that resuming repeats it."""
    rng = np.random.default_rng([cfg.seed, rank, step, 7])  # 7: this stream's tag, apart from other draws
    apply = rng.random(batch) < cfg.blur_p
    sigma = rng.uniform(cfg.blur_sigma_min, cfg.blur_sigma_max, size=batch)
    return apply, sigma


def blur(images: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
    """3x3 Gaussian blur (torchvision's, reflect padding) of each image (B, 3, H, W) with its own σ (B,).

    Blurring the normalised tensor equals normalising the blurred image: the kernel sums to 1.
    """
    return torch.stack([TF.gaussian_blur(image, [BLUR_KERNEL, BLUR_KERNEL], [float(s), float(s)])
                        for image, s in zip(images, sigma, strict=True)])


def augmented_features(backbone, feats: torch.Tensor, images: torch.Tensor, apply: np.ndarray,
                       sigma: np.ndarray) -> torch.Tensor:
    """Features (B, C, h, w) of x_aug: the cached ones where no blur was drawn (x_aug = x there), a live
    backbone pass on the blurred images elsewhere."""
    out = feats.clone()
    picked = np.flatnonzero(apply)
    if len(picked):
        index = torch.from_numpy(picked).to(feats.device)
        out[index] = backbone(blur(images[index], sigma[picked])).to(feats.dtype)
    return out


def build_modules(cfg: EagleConfig, feature_dim: int, n_classes: int) -> nn.ModuleDict:
    """Head, projection and probes, in one container so a checkpoint holds them all."""
    return nn.ModuleDict({
        "head": EagleHead(feature_dim, cfg.code_dim, dropout=cfg.dropout, nonlinear=cfg.nonlinear),
        "projection": Projection(cfg.code_dim),
        "eigen_probe": EigenClusterProbe(cfg.eigen_k - 1, cfg.eigen_clusters),
        "eigen_probe_aug": EigenClusterProbe(cfg.eigen_k - 1, cfg.eigen_clusters),
        "linear_probe": LinearProbe(cfg.code_dim, n_classes),
        "cluster_probe": ClusterProbe(cfg.code_dim, n_classes, n_extra=cfg.n_extra_clusters),
    })


def build_optimizers(cfg: EagleConfig, modules: nn.ModuleDict) -> dict[str, torch.optim.Optimizer]:
    """One Adam per part, as the original (head and projection 5e-4, probes their own rates), no schedule."""
    rates = {"head": cfg.lr_head, "projection": cfg.lr_head, "eigen_probe": cfg.lr_eigen,
             "eigen_probe_aug": cfg.lr_eigen, "linear_probe": cfg.lr_linear, "cluster_probe": cfg.lr_cluster}
    return {name: torch.optim.Adam(modules[name].parameters(), lr=lr) for name, lr in rates.items()}


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B, N, D), row-major tokens."""
    return t.flatten(2).transpose(1, 2)


def eicue_segments(probe: nn.Module, image: torch.Tensor, code: torch.Tensor,
                   cfg: EagleConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """EiCue of one view: (eigen-probe loss, segment id of every token (B·h·w,)). code (B, D, h, w)."""
    batch, _, h, w = code.shape
    vectors = eigenvectors(image, _tokens(code.detach()), cfg.eigen_k, colour=cfg.colour, sigma=cfg.colour_sigma,
                           solver=cfg.eigen_solver)  # (B, N, k)
    embedding = vectors[..., 1:].transpose(1, 2).reshape(batch, cfg.eigen_k - 1, h, w)  # the trivial one dropped
    loss, log_probs = probe(embedding, 1.0)
    return loss, log_probs.argmax(dim=1).reshape(-1)


def step_losses(modules: nn.ModuleDict, head: nn.Module, feats: torch.Tensor, feats_aug: torch.Tensor,
                images: torch.Tensor, labels: torch.Tensor | None, cfg: EagleConfig,
                step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The total loss of one step. `head` is the (possibly DDP-wrapped) head.

    feats, feats_aug: (B, C, h, w) features of x and x_aug; images: (B, 3, H, W) the unblurred images (EiCue's
    colour for both views, as the original); labels: (B, H, W) with -1 = ignore, or None (linear probe skipped).
    """
    batch = feats.shape[0]
    signal_all, code_all = head(torch.cat([feats, feats_aug]))  # one forward: DDP sees a single call
    signal, signal_aug = signal_all[:batch], signal_all[batch:]
    code, code_aug = code_all[:batch], code_all[batch:]
    check_finite(code_all, step, name="code")  # a diverged head stops here, before EiCue and before any update
    corr, corr_terms = correspondence_loss(signal, signal_aug, code, code_aug, cfg.correspondence())

    eig, segments = eicue_segments(modules["eigen_probe"], images, code, cfg)
    eig_aug, segments_aug = eicue_segments(modules["eigen_probe_aug"], images, code_aug, cfg)
    z = modules["projection"](_tokens(code).reshape(-1, cfg.code_dim))  # (B·N, D) unit rows
    z_aug = modules["projection"](_tokens(code_aug).reshape(-1, cfg.code_dim))
    opts = dict(temperature=cfg.temperature, global_weight=cfg.global_weight, smoothing=cfg.label_smoothing)
    obj, obj_terms = object_centric_loss(z, z_aug, segments, token_weights(signal), **opts)
    obj_aug, _ = object_centric_loss(z_aug, z, segments_aug, token_weights(signal_aug), **opts)

    detached = code.detach()  # the probes never move the head
    cluster_loss, _ = modules["cluster_probe"](detached, None)
    linear_loss = torch.zeros((), device=feats.device)
    if labels is not None:
        stride = cfg.linear_label_stride
        labels = labels[:, ::stride, ::stride] if stride > 1 else labels
        linear_loss = modules["linear_probe"].loss(modules["linear_probe"](detached), labels)
    u = schedule(step, cfg.schedule_step, cfg.schedule_limit)
    total = ((eig + eig_aug) / 2 + (1 - u) * corr + u * cfg.obj_weight * (obj + obj_aug)
             + linear_loss + cluster_loss)
    logs = {"loss/total": total, "loss/eigen": eig, "loss/eigen_aug": eig_aug, "loss/correspondence": corr,
            "loss/pos": corr_terms["pos"], "loss/neg": corr_terms["neg"], "loss/obj": obj, "loss/obj_aug": obj_aug,
            "loss/obj_local": obj_terms["local"], "loss/obj_global": obj_terms["global"],
            "loss/linear": linear_loss, "loss/cluster": cluster_loss, "schedule/u": torch.tensor(u),
            "eicue/segments": torch.tensor(float(segments.unique().numel()))}
    return total, {k: v.detach() for k, v in logs.items()}


def apply_gradients(total: torch.Tensor, modules: nn.ModuleDict, optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Backward and one step of every optimizer. DDP averages the head's gradients; the other parts are not
    wrapped, so theirs are averaged over the ranks here (a no-op in a single process)."""
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    total.backward()
    for name, module in modules.items():
        if name != "head":
            for param in module.parameters():
                if param.grad is not None:
                    all_reduce_mean(param.grad)
    for optimizer in optimizers.values():
        optimizer.step()


def eval_head(modules: nn.ModuleDict, alpha: float) -> EagleEvalHead:
    """`features (B, C, h, w) -> {code, cluster_logits, linear_logits}`, validated and exported (call .eval())."""
    return EagleEvalHead(modules["head"], modules["cluster_probe"], modules["linear_probe"], alpha)
