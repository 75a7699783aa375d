"""The synthetic benchmark of PU-SegNet's "numbers to reach", on plain tensors (no backbone).

Images have planted classes (Voronoi regions of random seeds); a pixel's feature is its class prototype plus a
per-image style vector plus noise, blurred over 5x5 so that boundary pixels mix their neighbours' classes. The
base segmenter is a STEGO-like cosine cluster probe (centres at the prototypes, alpha = 2) whose predictions
are corrupted on 20% of the pixels by structured noise near the class boundaries: spatially coherent runs of
boundary pixels (where a smooth random field is high) take the class of their nearest other-class pixel, by
swapping the two classes' logits. PU-SegNet and the deterministic ablation train on the base's pseudo-labels and
confidences with the same losses; everything is scored on held-out images against the true classes.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from pusegnet.config import PusegnetConfig
from pusegnet.steps import (
    IndexStream,
    apply_gradients,
    build_modules,
    build_optimizers,
    eval_head,
    precision_window_start,
    step_generator,
    step_losses,
    update_precision,
)
from shared.calibration import CalibrationAccumulator, UncertaintyAccumulator
from shared.metrics import ConfusionAccumulator

N_CLASSES, DIM, GRID = 4, 32, 24


def planted_maps(n: int, generator: torch.Generator, n_seeds: int = 4) -> torch.Tensor:
    """(n, GRID, GRID) class maps: each pixel takes the class of its nearest of ``n_seeds`` random seeds."""
    seeds = torch.rand(n, n_seeds, 2, generator=generator) * GRID
    classes = torch.randint(N_CLASSES, (n, n_seeds), generator=generator)
    ys, xs = torch.meshgrid(torch.arange(GRID) + 0.5, torch.arange(GRID) + 0.5, indexing="ij")
    grid = torch.stack([ys, xs], dim=-1).reshape(1, -1, 1, 2)
    nearest = ((grid - seeds[:, None]) ** 2).sum(-1).argmin(-1)  # (n, GRID * GRID)
    return classes.gather(1, nearest).reshape(n, GRID, GRID)


def nearest_other_class(maps: torch.Tensor, radius: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance (Chebyshev, up to ``radius + 1``) of every pixel to a pixel of another class, and that class.

    Only pixels inside the image count: the maps are padded with -1, not rolled, so that the left edge does not
    see the right edge's class as a neighbour (with wrap-around, a third of the "boundary" noise lay on the
    image border, far from any class boundary)."""
    distance = torch.full(maps.shape, radius + 1)
    other = maps.clone()
    padded = F.pad(maps, (radius, radius, radius, radius), value=-1)
    height, width = maps.shape[1:]
    for r in range(radius, 0, -1):  # smaller radii overwrite larger ones
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                if max(abs(dy), abs(dx)) != r:
                    continue
                shifted = padded[:, radius + dy:radius + dy + height, radius + dx:radius + dx + width]
                hit = (shifted >= 0) & (shifted != maps)
                distance = torch.where(hit & (distance >= r), torch.full_like(distance, r), distance)
                other = torch.where(hit & (distance == r), shifted, other)
    return distance, other


def corrupt(maps: torch.Tensor, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-label maps with ``fraction`` of all pixels wrong, near boundaries, in spatially coherent runs.

    Score = -distance to the boundary + a smooth random field; the top ``fraction`` pixels that have another
    class nearby take that class. Returns (corrupted maps, mask of corrupted pixels)."""
    distance, other = nearest_other_class(maps)
    field = F.interpolate(torch.randn(len(maps), 1, 4, 4, generator=generator), size=(GRID, GRID),
                          mode="bilinear", align_corners=False)[:, 0]
    score = -distance.float() + 1.5 * field
    score = torch.where(distance <= 2, score, torch.full_like(score, -1e9))
    k = int(round(fraction * maps.numel()))
    mask = torch.zeros(maps.numel(), dtype=torch.bool)
    mask[score.flatten().topk(k).indices] = True
    mask = mask.reshape(maps.shape)
    return torch.where(mask, other, maps), mask


@dataclasses.dataclass
class Split:
    features: torch.Tensor  # (N, DIM, GRID, GRID)
    labels: torch.Tensor  # (N, GRID, GRID) true classes
    base_logits: torch.Tensor  # (N, K, GRID, GRID)


def make_split(n: int, prototypes: torch.Tensor, generator: torch.Generator, noise: float = 0.6,
               style: float = 0.5, alpha: float = 2.0, fraction: float = 0.2, margin: float = 0.2) -> Split:
    maps = planted_maps(n, generator)
    styles = style * F.normalize(torch.randn(n, DIM, 1, 1, generator=generator), dim=1)
    feats = prototypes[maps].permute(0, 3, 1, 2) + styles + noise * torch.randn(n, DIM, GRID, GRID,
                                                                                generator=generator) / DIM ** 0.5
    feats = F.avg_pool2d(F.pad(feats, (2, 2, 2, 2), mode="replicate"), 5, stride=1)  # boundary pixels mix
    cosine = torch.einsum("bchw,kc->bkhw", F.normalize(feats, dim=1), F.normalize(prototypes, dim=1))
    logits = alpha * cosine
    corrupted, mask = corrupt(maps, fraction, generator)
    # where corrupted, the corrupting class wins narrowly (margin 0.2): a base confused near a boundary
    top = logits.amax(1, keepdim=True)
    swapped = logits.scatter(1, corrupted[:, None], top + margin)
    logits = torch.where(mask[:, None], swapped, logits)
    return Split(feats, maps, logits)


def make_benchmark(seed: int = 0, n_train: int = 48, n_val: int = 24) -> tuple[Split, Split]:
    generator = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(N_CLASSES, DIM, generator=generator), dim=1)
    return make_split(n_train, prototypes, generator), make_split(n_val, prototypes, generator)


def bench_config(**overrides) -> PusegnetConfig:
    values = {"hidden_dim": 64, "n_layers": 2, "projection_dim": 32, "n_random_features": 256, "batch_size": 8,
              "max_steps": 300, "sim_samples": 32, "precision_pixels": 64, "lr_head": 3e-3,
              "linear_probe": False} | overrides
    return PusegnetConfig(**values)


def train(cfg: PusegnetConfig, split: Split) -> torch.nn.Module:
    """Train the head on the base's pseudo-labels of ``split`` and return the eval head (eval mode)."""
    torch.manual_seed(cfg.seed)
    modules = build_modules(cfg, DIM, N_CLASSES, N_CLASSES)
    optimizers = build_optimizers(cfg, modules)
    probs = torch.softmax(split.base_logits, 1)
    confidence, pseudo = probs.max(1)
    stream = IndexStream(len(split.features), cfg.batch_size, seed=cfg.seed)
    window = precision_window_start(cfg.max_steps, stream.steps_per_epoch)
    for step in range(cfg.max_steps):
        idx = torch.from_numpy(stream.batch(step))
        generator = step_generator(cfg.seed, 0, step)
        modules.train()
        total, _, out = step_losses(modules, modules["head"], split.features[idx], pseudo[idx], confidence[idx],
                                    None, cfg, generator)
        apply_gradients(total, modules, optimizers)
        if cfg.sngp and (cfg.precision_mode == "momentum" or step >= window):
            update_precision(modules["head"], out, cfg, generator)
    modules.eval()
    if cfg.sngp:
        modules["head"].converge_spectral_norm()
        modules["head"].laplace.finalize()
    return eval_head(modules, cfg).eval()


def score(probs: torch.Tensor, uncertainty: torch.Tensor, labels: torch.Tensor) -> dict:
    """mIoU (Hungarian, percent), ECE (fraction) and the error-detection AUROC of ``uncertainty``."""
    pred = probs.argmax(1)
    confusion = ConfusionAccumulator(N_CLASSES, N_CLASSES)
    confusion.update(pred, labels)
    scores = confusion.compute()
    mapping = list(scores["mapping"])
    calib = CalibrationAccumulator(15, N_CLASSES)
    calib.update(probs, labels, mapping)
    unc = UncertaintyAccumulator(1000, (0.0, float(uncertainty.max()) + 1e-6))
    unc.update(uncertainty, pred, labels, mapping)
    return {"miou": scores["miou"], "acc": scores["acc"], "ece": calib.compute()["ece"],
            "conf": float(probs.amax(1).mean()),
            "auroc": unc.compute()["auroc"]}


def evaluate(head: torch.nn.Module, split: Split) -> dict:
    with torch.no_grad():
        out = head(split.features)
    return score(torch.softmax(out["cluster_logits"], 1), out["variance"], split.labels)


def evaluate_base(split: Split) -> dict:
    probs = torch.softmax(split.base_logits, 1)
    return score(probs, 1.0 - probs.amax(1), split.labels)


def run_benchmark(seed: int = 0, **overrides) -> dict:
    """{"base", "pusegnet", "deterministic"}: scores of the three on the held-out images."""
    train_split, val_split = make_benchmark(seed)
    cfg = bench_config(seed=seed, **overrides)
    return {"base": evaluate_base(val_split), "pusegnet": evaluate(train(cfg, train_split), val_split),
            "deterministic": evaluate(train(dataclasses.replace(cfg, sngp=False), train_split), val_split)}


if __name__ == "__main__":
    import sys
    import time

    began = time.perf_counter()
    overrides = dict(arg.split("=") for arg in sys.argv[1:])
    cfg_types = {f.name: f.type for f in dataclasses.fields(PusegnetConfig)}
    parsed = {k: (float(v) if "." in v or "e" in v else int(v)) if v not in ("true", "false") else v == "true"
              for k, v in overrides.items()}
    for name, result in run_benchmark(**parsed).items():
        print(f"{name:>14}: " + "  ".join(f"{k} {v:.3f}" for k, v in result.items()))
    print(f"{time.perf_counter() - began:.1f} s")
