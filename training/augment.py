"""Batch augmentation for chest X-rays, done on whole tensors (fast on 2 CPU cores).

Small rotations, scale and shifts, brightness/contrast/gamma. No left-right flip: the model
reports infection per lung (patient left/right), so a flip would teach it the wrong side.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine(
    images: torch.Tensor,
    masks: torch.Tensor,
    generator: torch.Generator,
    max_degrees: float = 10.0,
    scale: tuple[float, float] = (0.9, 1.1),
    max_shift: float = 0.06,
) -> tuple[torch.Tensor, torch.Tensor]:
    b = images.shape[0]
    angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(max_degrees)
    s = torch.empty(b).uniform_(scale[0], scale[1], generator=generator)
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * max_shift * 2
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    masks = F.grid_sample(masks, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return images, masks


def random_intensity(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    b = images.shape[0]
    shape = (b, 1, 1, 1)
    gamma = torch.exp(torch.empty(shape).uniform_(-0.3, 0.3, generator=generator))
    contrast = torch.empty(shape).uniform_(0.8, 1.2, generator=generator)
    brightness = torch.empty(shape).uniform_(-0.08, 0.08, generator=generator)
    out = images.clamp(0, 1).pow(gamma)
    mean = out.mean(dim=(2, 3), keepdim=True)
    out = (out - mean) * contrast + mean + brightness
    return out.clamp_(0, 1)


def augment(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = random_affine(images, masks, generator)
    return random_intensity(images, generator), masks


def augment_v2(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Model 2.0's recipe: wider crops and zooms, then randomised acquisition
    (:mod:`training.acquisition`), then the mild global intensity jitter of 1.0."""
    from training.acquisition import randomise_acquisition

    images, masks = random_affine(images, masks, generator, max_degrees=12.0,
                                  scale=(0.85, 1.25), max_shift=0.08)
    images, masks = randomise_acquisition(images, masks, generator)
    return random_intensity(images, generator), masks


AUGMENTATIONS = {"v1": augment, "v2": augment_v2}
