"""Throughput and bf16 accuracy of our dinov2_vits14 (random weights, 224 px, batch 8, 2 CPU threads), on the
benchmarks' device (`benchmarks.timing.bench_device()`: the CPU unless run_all's --device says otherwise).

Configurations: "fp32" and "bf16" are shared.backbone.FrozenBackbone as the methods use it (bf16: autocast
with the matmul weights cast to bf16 once); "bf16_autocast_only" is plain autocast on float32 weights, to
show what the one-time cast buys (its outputs are bitwise the same as "bf16"); "fp32_explicit_attention"
runs every block through the explicit-softmax path, which is how the official DINOv2 code computes
attention on a CPU without xformers, as a stand-in for the official implementation's speed.

    python -m benchmarks.backbone [--repeats 5]      (USS_BENCH_DEVICE=cuda for the GPU)

When `timm` imports, its independent ViT-S/14 implementation gets our weights (same keys; our 224 px
position embeddings copied in) for a numerical parity check and a float32 throughput comparison.
Configurations are timed interleaved, one forward each per round, so a busy shared machine slows all of
them alike and the ratios stay meaningful; every figure is a median over the rounds.
"""

import argparse
import copy
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.timing import bench_device, device_label, seconds
from dinov2_patched import build_model
from dinov2_patched.pos_embed import interpolate_pos_embed
from shared.backbone import FrozenBackbone, bf16_supported

MODEL, RESOLUTION, BATCH, THREADS = "dinov2_vits14", 224, 8, 2


def _timm_model(ours: torch.nn.Module) -> torch.nn.Module | None:
    """timm's vit_small_patch14_dinov2 carrying our weights, or None when timm is not installed."""
    try:
        import timm  # noqa: PLC0415  (optional, only for this comparison)
    except ImportError:
        return None
    other = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=RESOLUTION).eval()
    state = {k: v for k, v in ours.state_dict().items() if k != "mask_token"}
    grid = RESOLUTION // ours.patch_size
    state["pos_embed"] = interpolate_pos_embed(ours.pos_embed.detach(), grid, grid, ours.pos_interpolation)
    other.load_state_dict(state, strict=True)
    return other.to(ours.pos_embed.device)


def _configs(model: torch.nn.Module, images: torch.Tensor, use_bf16: bool) -> dict[str, Callable[[], torch.Tensor]]:
    """Name -> zero-argument forward returning (B, N, C) float32 patch features."""
    tokens = lambda features: features.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, N, C)
    fp32 = FrozenBackbone(copy.deepcopy(model), force_float32=True)
    configs = {"fp32": lambda: tokens(fp32(images))}

    @torch.no_grad()
    def explicit_attention() -> torch.Tensor:
        return fp32.model.forward_features(images, return_attention=True)["x_norm_patchtokens"]

    configs["fp32_explicit_attention"] = explicit_attention
    if use_bf16:
        bf16 = FrozenBackbone(copy.deepcopy(model))
        configs["bf16"] = lambda: tokens(bf16(images))

        @torch.no_grad()
        def autocast_only() -> torch.Tensor:
            with torch.autocast(images.device.type, dtype=torch.bfloat16):
                return fp32.model.forward_features(images)["x_norm_patchtokens"].float()

        configs["bf16_autocast_only"] = autocast_only
    other = _timm_model(model)
    if other is not None:
        configs["timm_fp32"] = torch.no_grad()(lambda: other.forward_features(images)[:, 1:])
    return configs


def measure(repeats: int = 5) -> dict[str, float | bool | None]:
    """Flat medians over `repeats` rounds: images/s per configuration, ratios, bf16 cosine, timm parity."""
    torch.set_num_threads(THREADS)
    device = bench_device()
    model = build_model(MODEL, weights="none").to(device)
    images = torch.randn(BATCH, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0)).to(device)
    use_bf16 = bf16_supported(device)
    configs = _configs(model, images, use_bf16)
    outputs = {name: fn() for name, fn in configs.items()}  # warm-up, and the outputs to compare
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, fn in configs.items():
            times[name].append(seconds(fn, device))
    speed = {name: BATCH / statistics.median(values) for name, values in times.items()}
    result: dict[str, float | bool | None] = {f"{name}_images_per_s": value for name, value in speed.items()}
    # Best-of figures too: on a shared machine the least-disturbed round is often the steadier estimate.
    result |= {f"{name}_images_per_s_best": BATCH / min(values) for name, values in times.items()}
    result["bf16_supported"] = use_bf16
    result["fp32_over_explicit_attention"] = speed["fp32"] / speed["fp32_explicit_attention"]
    if use_bf16:
        result["bf16_over_fp32"] = speed["bf16"] / speed["fp32"]
        result["bf16_autocast_only_over_fp32"] = speed["bf16_autocast_only"] / speed["fp32"]
        cosine = F.cosine_similarity(outputs["bf16"], outputs["fp32"], dim=-1)  # per token
        result["bf16_cosine_mean"], result["bf16_cosine_min"] = cosine.mean().item(), cosine.min().item()
    if "timm_fp32" in outputs:
        result["fp32_over_timm"] = speed["fp32"] / speed["timm_fp32"]
        result["timm_max_abs_diff"] = (outputs["timm_fp32"] - outputs["fp32"]).abs().max().item()
    return result


_ROWS = [  # (configuration, row name, reference configuration)
    ("fp32", "ours fp32", None),
    ("bf16", "ours bf16 autocast (weights cast once)", "fp32"),
    ("bf16_autocast_only", "ours bf16 autocast only", "fp32"),
    ("fp32_explicit_attention", "ours fp32, explicit attention (official-style)", "fp32"),
    ("timm_fp32", "timm vit_small_patch14_dinov2 fp32", "fp32"),
]


def run(repeats: int = 5) -> dict:
    """benchmarks.run_all schema (title, rows with ratios, notes) plus "metrics": the flat medians of `measure`."""
    metrics = measure(repeats)
    speeds = {name: metrics.get(f"{name}_images_per_s") for name, _, _ in _ROWS}
    rows = []
    for name, label, reference in _ROWS:
        if speeds[name] is None:
            continue
        row = {"name": label, "value": speeds[name], "unit": "images/s"}
        if reference is not None:
            row |= {"reference": "ours fp32", "ratio": speeds[name] / speeds[reference]}
        rows.append(row)
    notes = [f"on {device_label(bench_device())}: random weights, batch {BATCH}, {THREADS} CPU threads, medians of "
             f"{repeats} interleaved rounds"]
    if metrics.get("bf16_cosine_min") is not None:
        notes.append(f"bf16 vs fp32 patch features: cosine mean {metrics['bf16_cosine_mean']:.6f}, "
                     f"min {metrics['bf16_cosine_min']:.6f}")
    else:
        notes.append(f"no native bf16 on {bench_device()}: bf16 rows skipped")
    if metrics.get("timm_max_abs_diff") is not None:
        notes.append(f"timm on our weights: max abs difference {metrics['timm_max_abs_diff']:.3g}")
    title = f"Backbone forward, {MODEL}, {RESOLUTION}x{RESOLUTION}"
    return {"title": title, "rows": rows, "notes": notes, "metrics": metrics}


def _format(value: float | bool | None) -> str:
    if value is None:
        return "n/a"
    return str(value) if isinstance(value, bool) else f"{value:.6g}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (medians are reported)")
    args = parser.parse_args(argv)
    result = measure(args.repeats)
    print(f"{MODEL} on {device_label(bench_device())}, random weights, {RESOLUTION} px, batch {BATCH}, {THREADS} "
          f"CPU threads, {args.repeats} rounds")
    for key, value in result.items():
        print(f"  {key:<32} {_format(value)}")


if __name__ == "__main__":
    main()
