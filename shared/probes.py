"""Cluster probe (hard cosine k-means) and linear probe, shared by every method.

Both are trained on the *detached* code by the caller (``probe(code.detach())``), each with its own optimiser,
so they measure the code without shaping it. `fit_evaluator_probe` is the comparison's linear probe: one
recipe (`ProbeRecipe`) fitted on every method's exported code, so the linear columns are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class ClusterProbe(nn.Module):
    """``n_classes + n_extra`` learnable centres scored by cosine similarity.

    ``inner = <normalize(code), normalize(centre)>`` (B, K', h, w); the training loss is hard cosine k-means
    ``-(onehot(argmax inner) * inner).sum(clusters).mean()``; the logits are ``alpha * inner`` so that
    ``softmax(logits)`` are the evaluation probabilities.
    """

    def __init__(self, code_dim: int, n_classes: int, n_extra: int = 0, alpha: float = 2.0) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.n_extra = n_extra
        self.alpha = alpha
        self.centres = nn.Parameter(torch.randn(n_classes + n_extra, code_dim))

    @property
    def n_clusters(self) -> int:
        return self.centres.shape[0]

    def inner(self, code: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every pixel to every centre: code (B, D, h, w) -> (B, K', h, w)."""
        return torch.einsum("bdhw,kd->bkhw", F.normalize(code, dim=1), F.normalize(self.centres, dim=1))

    def forward(self, code: torch.Tensor, alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """code (B, D, h, w) -> (loss scalar, logits (B, K', h, w)); ``alpha`` defaults to ``self.alpha``."""
        inner = self.inner(code)
        hard = F.one_hot(inner.argmax(dim=1), self.n_clusters).permute(0, 3, 1, 2).to(inner.dtype)
        loss = -(hard * inner).sum(dim=1).mean()
        return loss, (self.alpha if alpha is None else alpha) * inner


class LinearProbe(nn.Module):
    """1x1 convolution code -> class logits, trained with cross-entropy on labelled pixels."""

    def __init__(self, code_dim: int, n_classes: int) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.conv = nn.Conv2d(code_dim, n_classes, kernel_size=1)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        """code (B, D, h, w) -> logits (B, K, h, w)."""
        return self.conv(code)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of logits (B, K, h, w) bilinearly upsampled to labels (B, H, W); -1 (and any label
        outside ``[0, K)``) is ignored. Returns 0 (with a gradient path) when no pixel is labelled."""
        labels = labels.long()
        labels = torch.where((labels >= 0) & (labels < self.n_classes), labels, torch.full_like(labels, -1))
        up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        if not (labels >= 0).any():
            return up.sum() * 0.0
        return F.cross_entropy(up, labels, ignore_index=-1)


@dataclass(frozen=True)
class ProbeRecipe:
    """How the evaluator fits the linear probe on a method's exported code: the same for every method.

    Pixels are drawn (seeded) at label resolution from up to `max_images` training images, `pixels_per_image`
    labelled pixels each; the code is bilinearly interpolated there (the probe is linear, so this equals the
    methods' own objective of upsampling the probe's logits), and a 1x1 linear layer is trained on those vectors
    with Adam for `steps` mini-batches of `batch_size`.
    """

    max_images: int = 200
    pixels_per_image: int = 256
    steps: int = 300
    batch_size: int = 4096
    lr: float = 5e-3
    seed: int = 0

    def describe(self) -> str:
        return (f"a linear layer on each method's exported code, fitted by the evaluator with one recipe for all: "
                f"{self.pixels_per_image} labelled pixels from each of up to {self.max_images} training images "
                f"(seed {self.seed}), Adam lr {self.lr:g}, {self.steps} steps of {self.batch_size} pixels")


def _sample_code(code: torch.Tensor, labels: torch.Tensor, n: int, n_classes: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `n` labelled pixels of one image: code (D, h, w) bilinearly sampled at label positions of (H, W)."""
    height, width = labels.shape
    valid = ((labels >= 0) & (labels < n_classes)).flatten().nonzero().squeeze(1)
    if len(valid) == 0:
        return code.new_zeros(0, code.shape[0]), labels.new_zeros(0)
    chosen = valid[torch.randperm(len(valid), generator=generator)[:n]]
    ys, xs = chosen // width, chosen % width
    # align_corners=False pixel centres, as F.interpolate(mode="bilinear") uses when upsampling logits
    grid = torch.stack([(xs.float() + 0.5) / width * 2 - 1, (ys.float() + 0.5) / height * 2 - 1], dim=1)
    sampled = F.grid_sample(code[None].float(), grid[None, None], mode="bilinear", align_corners=False,
                            padding_mode="border")  # (1, D, 1, n)
    return sampled[0, :, 0].T, labels.flatten()[chosen]


def fit_evaluator_probe(code_fn, features, labels, n_classes: int, recipe: ProbeRecipe = ProbeRecipe(),
                        device: str | torch.device = "cpu") -> LinearProbe:
    """Fit the evaluator's linear probe: ``code_fn`` maps features (B, C, h, w) to code (B, D, h, w); ``features``
    (N, C, h, w) and ``labels`` (N, H, W) are a cached training split. Uses its own random generators only."""
    generator = torch.Generator().manual_seed(recipe.seed)
    order = torch.randperm(len(features), generator=generator)[:recipe.max_images].sort().values
    vectors, targets = [], []
    with torch.no_grad():
        for start in range(0, len(order), 16):
            idx = order[start:start + 16].numpy()
            x = torch.from_numpy(np.asarray(features[idx], dtype=np.float32)).to(device)
            code = code_fn(x).float().cpu()
            for b, i in enumerate(idx):
                v, t = _sample_code(code[b], torch.from_numpy(np.asarray(labels[i], dtype=np.int64)),
                                    recipe.pixels_per_image, n_classes, generator)
                vectors.append(v)
                targets.append(t)
    x_all, y_all = torch.cat(vectors), torch.cat(targets)
    if len(y_all) == 0:
        raise ValueError("the training split has no labelled pixels; the evaluator's linear probe needs labels.")
    with torch.random.fork_rng(devices=[]):  # its default init would draw from the global stream
        probe = LinearProbe(x_all.shape[1], n_classes)
    with torch.no_grad():
        probe.conv.weight.copy_(torch.randn(probe.conv.weight.shape, generator=generator) * 0.01)
        probe.conv.bias.zero_()
    optimizer = torch.optim.Adam(probe.parameters(), lr=recipe.lr)
    for _ in range(recipe.steps):
        pick = torch.randint(len(y_all), (min(recipe.batch_size, len(y_all)),), generator=generator)
        # The 1x1 convolution as the matrix product it is: conv2d over a batch of 4096 one-pixel images is ~50x
        # slower on the CPU than the same weights through F.linear.
        weight = probe.conv.weight.view(probe.conv.weight.shape[0], -1)
        logits = F.linear(x_all[pick], weight, probe.conv.bias)
        loss = F.cross_entropy(logits, y_all[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return probe.eval().requires_grad_(False).to(device)
