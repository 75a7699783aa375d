"""The numerical size of STEGO's deviations from the original code, measured on the bundled CamVid sample.

    python -m benchmarks.stego_deviations [--images 4]      (numbers quoted in stego/README.md)

- bf16 backbone: patch features under bf16 autocast vs float32 (`build_backbone(..., force_float32=True)`),
  random weights. On a CPU without native bf16 the default is already float32, so bf16 is switched on by hand
  there (emulated, same rounding of inputs and weights, float32 accumulation).
- float16 feature cache: the rounding of float32 features stored as float16, and what it does to the feature
  correlations `F` of the correspondence loss.
- CRF image: our uint8 image is rounded, the original's truncated (`to_pil_image` of a float tensor); how many
  image values and CRF labels differ, with a random head and cluster probe on random-weight features.
- five-crop JPEG quality: our crops are saved at quality 95, the original's at PIL's default 75.

The backbone features (bf16 and float16 rows) are computed on the benchmarks' device (`bench_device()`), where
training computes them; the CRF and JPEG rows are CPU work (pydensecrf and PIL on numpy arrays) and stay there.
"""

from __future__ import annotations

import argparse
import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks.timing import bench_device, cpu_only_notes, device_label
from shared.backbone import build_backbone, store_matmul_weights_in_bf16
from shared.crf import crf_from_probs, image_to_bgr_uint8
from shared.data import build_dataset
from shared.data.prepare.five_crop import five_crop_windows
from shared.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from shared.probes import ClusterProbe
from stego.model import StegoHead

VAL_RESOLUTION, THREADS = 322, 2


def _images(n: int, resolution: int) -> torch.Tensor:
    """The first n validation views of the bundled sample: (n, 3, R, R), ImageNet-normalised."""
    ds = build_dataset("camvid_sample", "val", resolution=resolution)
    return torch.stack([ds[i]["image"] for i in range(n)])


def _bf16_backbone(name: str, device: torch.device):
    backbone = build_backbone(name, "none", device=device)
    emulated = not backbone.use_bf16
    if emulated:  # what FrozenBackbone does on bf16 hardware
        backbone.use_bf16 = True
        store_matmul_weights_in_bf16(backbone.model)
    return backbone, emulated


def bf16_vs_fp32(name: str, images: torch.Tensor) -> dict:
    """Per-patch cosine and max abs difference of bf16 vs float32 features (random weights), on images' device."""
    reference = build_backbone(name, "none", force_float32=True, device=images.device)(images)  # (B, C, h, w)
    backbone, emulated = _bf16_backbone(name, images.device)
    bf16 = backbone(images)
    cosine = F.cosine_similarity(bf16, reference, dim=1)
    return {"cos_mean": cosine.mean().item(), "cos_min": cosine.min().item(),
            "max_abs": (bf16 - reference).abs().max().item(), "feature_max_abs": reference.abs().max().item(),
            "rel_l2": ((bf16 - reference).norm() / reference.norm()).item(), "emulated": emulated,
            "features": reference}


def _correlations(features: torch.Tensor) -> torch.Tensor:
    """Cosine between every pair of patches of each image: (B, C, h, w) -> (B, hw, hw), as the loss's F."""
    flat = F.normalize(features.flatten(2), dim=1, eps=1e-10)
    return torch.einsum("bcn,bcm->bnm", flat, flat)


def float16_rounding(features: torch.Tensor) -> dict:
    """Error of storing float32 features as float16 (the cache), on the features and on F."""
    rounded = features.half().float()
    err = (rounded - features).abs()
    big = features.abs() > 1e-3  # relative error of the values that matter; tiny ones round to an absolute 1e-7
    return {"max_abs": err.max().item(), "max_rel": (err[big] / features.abs()[big]).max().item(),
            "cos_min": F.cosine_similarity(rounded, features, dim=1).min().item(),
            "corr_max_abs": (_correlations(rounded) - _correlations(features)).abs().max().item()}


def _truncated_bgr(image: torch.Tensor) -> np.ndarray:
    """The original's CRF image: unnormalise, then `to_pil_image` of a float tensor (x * 255, truncated)."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (image * std + mean).clamp(0, 1).mul(255).to(torch.uint8).permute(1, 2, 0).numpy()
    return np.ascontiguousarray(rgb[:, :, ::-1])


def crf_rounding(images: torch.Tensor, features: torch.Tensor, n_classes: int = 11) -> dict:
    """Image values and CRF labels that differ between the rounded and the truncated image, random head."""
    torch.manual_seed(0)
    head, probe = StegoHead(features.shape[1], 70).eval(), ClusterProbe(70, n_classes)
    with torch.no_grad():
        logits = probe(head(features)[1])[1]  # (B, K, h, w), alpha 2 as at evaluation
        probs = F.softmax(F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False), 1)
    values = pixels = labels = 0
    for image, p in zip(images, probs.numpy(), strict=True):
        rounded, truncated = image_to_bgr_uint8(image), _truncated_bgr(image)
        values += int((rounded != truncated).sum())
        pixels += int((rounded != truncated).any(axis=2).sum())
        ours, theirs = crf_from_probs(rounded, p).argmax(0), crf_from_probs(truncated, p).argmax(0)
        labels += int((ours != theirs).sum())
    n = images.shape[0] * images.shape[2] * images.shape[3]
    return {"values": values / (3 * n), "pixels": pixels / n, "labels": labels / n, "n_pixels": n}


def _jpeg(array: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB")).astype(np.float64)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a - b) ** 2)))


def jpeg_quality(n: int) -> dict:
    """PSNR of five crops saved at quality 95 (ours) and 75 (PIL's default, the original's) vs the decoded source."""
    ds = build_dataset("camvid_sample", "train")
    psnr95, psnr75, psnr_between, max_diff = [], [], [], 0.0
    for i in range(n):
        image = ds.load_arrays(i)[0]
        for top, left, h, w in five_crop_windows(*image.shape[:2]):
            crop = np.ascontiguousarray(image[top : top + h, left : left + w])
            q95, q75 = _jpeg(crop, 95), _jpeg(crop, 75)
            psnr95.append(_psnr(q95, crop))
            psnr75.append(_psnr(q75, crop))
            psnr_between.append(_psnr(q95, q75))
            max_diff = max(max_diff, float(np.abs(q95 - q75).max()))
    return {"psnr95": float(np.mean(psnr95)), "psnr75": float(np.mean(psnr75)),
            "psnr_95_vs_75": float(np.mean(psnr_between)), "max_diff_95_vs_75": max_diff, "n_crops": 5 * n}


def run(n_images: int = 4) -> dict:
    """All four measurements in run_all's schema."""
    torch.set_num_threads(THREADS)
    device = bench_device()
    images = _images(n_images, VAL_RESOLUTION)
    rows, notes = [], []
    for name in ("dinov2_vits14", "dinov2_vitb14"):
        bf = bf16_vs_fp32(name, images.to(device))
        rows += [{"name": f"{name} bf16 vs fp32: per-patch cosine, mean", "value": bf["cos_mean"], "unit": ""},
                 {"name": f"{name} bf16 vs fp32: per-patch cosine, min", "value": bf["cos_min"], "unit": ""},
                 {"name": f"{name} bf16 vs fp32: max abs diff", "value": bf["max_abs"], "unit": ""},
                 {"name": f"{name} bf16 vs fp32: relative L2 error", "value": bf["rel_l2"], "unit": ""},
                 {"name": f"{name} fp32 features: max abs", "value": bf["feature_max_abs"], "unit": ""}]
        if bf["emulated"]:
            notes.append(f"{name}: no native bf16 on {device}; bf16 autocast switched on by hand (emulated)")
        if name == "dinov2_vits14":
            features = bf["features"].cpu()
    f16 = float16_rounding(features)
    rows += [{"name": f"float16 cache: {k}", "value": v, "unit": ""} for k, v in f16.items()]
    crf = crf_rounding(images, features)
    rows += [{"name": f"CRF rounded vs truncated image: fraction of {k} that differ", "value": crf[k], "unit": ""}
             for k in ("values", "pixels", "labels")]
    jpeg = jpeg_quality(n_images)
    rows += [{"name": f"five-crop JPEG: {k}", "value": v, "unit": "dB" if "psnr" in k else ""}
             for k, v in jpeg.items() if k != "n_crops"]
    notes.append(f"{n_images} camvid_sample val images at {VAL_RESOLUTION} px ({crf['n_pixels']} pixels), "
                 f"{jpeg['n_crops']} five-crops of train images; random backbone weights; features on "
                 f"{device_label(device)}")
    notes += cpu_only_notes("the CRF and the JPEG coding", device)
    return {"title": "STEGO deviations from the original code, measured", "rows": rows, "notes": notes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    result = run(parser.parse_args().images)
    for row in result["rows"]:
        print(f"{row['name']}: {row['value']:.6g} {row['unit']}".rstrip())
    for note in result["notes"]:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
