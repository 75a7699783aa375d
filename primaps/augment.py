"""Photometric augmentations of the EM's views, on ImageNet-normalised image batches, drawn from a generator.

- `student_view`: the original's second ("student") view: Gaussian blur (kernel 21, sigma ~ U(0.1, 2)), then with
  probability 1/2 colour jitter (applied with p = 0.3; brightness, contrast, saturation, hue 0.1, random order),
  otherwise grayscale (p = 0.1).
- `photometric_view`: the list the original meant to add to both views (blur, colour jitter p = 0.3, grayscale
  p = 0.1, in that order) but dropped through a bug; used only with `photometric_augs=true`.

Deviation: the original jittered the *normalised* tensor, where torchvision clamps to [0, 1] and so wipes out most
of the image on the 15% of the views that get jitter; here every operation runs on the [0, 1] RGB image.
"""

from __future__ import annotations

import torch
import torchvision.transforms.functional as TF

from shared.data.transforms import IMAGENET_MEAN, IMAGENET_STD

JITTER = 0.1


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand((), generator=gen))


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (images * std.to(images) + mean.to(images)).clamp(0, 1)


def _from_unit(images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (images - mean.to(images)) / std.to(images)


def blur(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    sigma = _uniform(gen, 0.1, 2.0)
    return TF.gaussian_blur(image, kernel_size=21, sigma=sigma)


def color_jitter(image: torch.Tensor, gen: torch.Generator, p: float = 0.3) -> torch.Tensor:
    """torchvision's ColorJitter(0.1, 0.1, 0.1, 0.1) applied with probability p, on a (3, H, W) [0, 1] image."""
    if float(torch.rand((), generator=gen)) >= p:
        return image
    ops = [lambda x, f: TF.adjust_brightness(x, f), lambda x, f: TF.adjust_contrast(x, f),
           lambda x, f: TF.adjust_saturation(x, f), lambda x, f: TF.adjust_hue(x, f)]
    for k in torch.randperm(4, generator=gen).tolist():
        factor = _uniform(gen, -JITTER, JITTER) if k == 3 else _uniform(gen, 1 - JITTER, 1 + JITTER)
        image = ops[k](image, factor)
    return image


def grayscale(image: torch.Tensor, gen: torch.Generator, p: float = 0.1) -> torch.Tensor:
    if float(torch.rand((), generator=gen)) >= p:
        return image
    return TF.rgb_to_grayscale(image, num_output_channels=3)


def student_view(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) normalised -> the augmented second view, same shape and normalisation."""
    out = []
    for image in _to_unit(images):
        image = blur(image, gen)
        image = color_jitter(image, gen) if float(torch.rand((), generator=gen)) < 0.5 else grayscale(image, gen)
        out.append(image)
    return _from_unit(torch.stack(out))


def photometric_view(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) normalised -> blur, jitter (p 0.3), grayscale (p 0.1): the dropped augmentations."""
    out = [grayscale(color_jitter(blur(image, gen), gen), gen) for image in _to_unit(images)]
    return _from_unit(torch.stack(out))
