"""Augmentations that randomise how an X-ray was acquired, so the class cannot be read off it.

COVID-QU-Ex pools its classes from different sources; a network can learn the source (its tone
curve, noise, sharpness, compression, burned-in markers, borders) instead of the disease
(DeGrave, Janizek & Lee, Nat Mach Intell 2021). Each transform here draws that nuisance at random
for every image, independently of the label, so it carries no information about the class.
Masks are untouched except by :func:`random_letterbox`, which moves them with the image.
No left-right flip, as in :mod:`training.augment`: the model reports patient left/right.

Everything works on a float batch (B,1,H,W) in [0, 1] and a seeded ``torch.Generator``; the
per-image OpenCV steps (JPEG, equalisation, text) draw their parameters from the same generator.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

MARKER_TEXTS = ("R", "L", "AP", "PA", "PORTABLE", "SUPINE", "ERECT", "1", "A", "LT", "RT")


def _chosen(b: int, p: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(b, generator=generator) < p


def _uniform(shape: tuple[int, ...], lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.empty(shape).uniform_(lo, hi, generator=g)


def random_tone_curve(images: torch.Tensor, g: torch.Generator, knots: int = 6) -> torch.Tensor:
    """A random monotone piecewise-linear intensity curve per image (any window/LUT shape)."""
    b = images.shape[0]
    steps = _uniform((b, knots), 0.3, 1.7, g)
    ys = torch.cumsum(steps, 1)
    ys = torch.cat([torch.zeros(b, 1), ys / ys[:, -1:]], 1)  # (b, knots+1) from 0 to 1
    x = images.clamp(0, 1) * knots
    idx = x.floor().clamp(max=knots - 1).long()
    frac = x - idx
    flat = idx.view(b, -1)
    lo = torch.gather(ys, 1, flat).view_as(images)
    hi = torch.gather(ys, 1, flat + 1).view_as(images)
    return lo + (hi - lo) * frac


def random_blur_or_sharpen(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Gaussian blur (sigma 0.5-1.6 px) or unsharp masking: detector and processing sharpness."""
    b = images.shape[0]
    sigma = _uniform((b,), 0.5, 1.6, g)
    radius = 4
    xs = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kern = torch.exp(-(xs[None] ** 2) / (2 * sigma[:, None] ** 2))
    kern = kern / kern.sum(1, keepdim=True)  # (b, k)
    # depthwise separable blur, one kernel per image (images as channels of one sample)
    x = images.transpose(0, 1)  # (1, b, H, W)
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kern[:, None, None, :], groups=b)
    x = F.conv2d(x, kern[:, None, :, None], groups=b)
    blurred = x.transpose(0, 1)
    amount = _uniform((b, 1, 1, 1), -1.0, 1.0, g)
    # amount < 0: blur towards ``blurred``; > 0: sharpen by the same difference
    return (images + amount * (images - blurred)).clamp(0, 1)


def random_noise(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Additive Gaussian noise plus signal-dependent (quantum-like) noise."""
    b = images.shape[0]
    std = _uniform((b, 1, 1, 1), 0.003, 0.035, g)
    noise = torch.randn(images.shape, generator=g)
    return (images + noise * std * (0.5 + images.clamp(0, 1).sqrt())).clamp(0, 1)


def random_resample(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Down- then up-sample: the blur and aliasing of a low-resolution original."""
    h, w = images.shape[-2:]
    factor = float(_uniform((1,), 0.3, 0.8, g))
    small = F.interpolate(images, size=(max(8, int(h * factor)), max(8, int(w * factor))),
                          mode="area")
    mode = "bilinear" if float(torch.rand(1, generator=g)) < 0.5 else "nearest"
    return F.interpolate(small, size=(h, w), mode=mode).clamp(0, 1)


def _to_u8(img: torch.Tensor) -> np.ndarray:
    return (img[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def _from_u8(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.astype(np.float32) / 255.0)[None]


def jpeg_artefacts(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    quality = int(torch.randint(15, 85, (1,), generator=g))
    ok, buf = cv2.imencode(".jpg", _to_u8(img), [cv2.IMWRITE_JPEG_QUALITY, quality])
    decoded = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE) if ok else None
    return img if decoded is None else _from_u8(decoded)


def equalise(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Histogram equalisation or CLAHE: processing some sites apply before export."""
    arr = _to_u8(img)
    if float(torch.rand(1, generator=g)) < 0.5:
        return _from_u8(cv2.equalizeHist(arr))
    clip = float(_uniform((1,), 1.0, 4.0, g))
    return _from_u8(cv2.createCLAHE(clipLimit=clip, tileGridSize=(8, 8)).apply(arr))


def burned_in_text(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One to three side markers or labels, bright or dark, anywhere on the image."""
    arr = _to_u8(img)
    h, w = arr.shape
    for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
        text = MARKER_TEXTS[int(torch.randint(len(MARKER_TEXTS), (1,), generator=g))]
        scale = float(_uniform((1,), 0.4, 1.6, g)) * h / 256
        thick = max(1, int(scale * 2))
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        x = int(torch.randint(0, max(1, w - tw), (1,), generator=g))
        y = int(torch.randint(th, max(th + 1, h), (1,), generator=g))
        value = 255 if float(torch.rand(1, generator=g)) < 0.8 else 0
        cv2.putText(arr, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, value, thick, cv2.LINE_AA)
    return _from_u8(arr)


def random_letterbox(
    images: torch.Tensor, masks: torch.Tensor, g: torch.Generator, chosen: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squeeze chosen images along one axis and pad with black, as non-square originals are
    letterboxed at inference (COVID-QU-Ex images are all square, so the model never saw bars)."""
    h, w = images.shape[-2:]
    images, masks = images.clone(), masks.clone()
    for i in torch.nonzero(chosen).flatten().tolist():
        ratio = float(_uniform((1,), 0.65, 0.95, g))
        vertical_bars = float(torch.rand(1, generator=g)) < 0.5
        nh, nw = (h, int(w * ratio)) if vertical_bars else (int(h * ratio), w)
        top, left = (h - nh) // 2, (w - nw) // 2
        img = F.interpolate(images[i : i + 1], size=(nh, nw), mode="area")
        msk = F.interpolate(masks[i : i + 1], size=(nh, nw), mode="nearest")
        images[i].zero_()
        masks[i].zero_()
        images[i, :, top : top + nh, left : left + nw] = img[0]
        masks[i, :, top : top + nh, left : left + nw] = msk[0]
    return images, masks


def replace_outside_lungs(
    images: torch.Tensor, lungs: torch.Tensor, g: torch.Generator, chosen: torch.Tensor
) -> torch.Tensor:
    """Replace what lies well outside the (dilated) lung mask by a flat, noisy or blurred fill,
    so nothing there (collimation, text, devices, body habitus) can be relied on for the class."""
    out = images.clone()
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (31, 31))
    for i in torch.nonzero(chosen).flatten().tolist():
        lung = lungs[i, 0].numpy().astype(np.uint8)
        outside = torch.from_numpy(cv2.dilate(lung, kernel) == 0)[None]
        if not bool(outside.any()):
            continue
        kind = int(torch.randint(3, (1,), generator=g))
        if kind == 0:
            fill = torch.full_like(images[i], float(torch.rand(1, generator=g)))
        elif kind == 1:
            fill = torch.rand(images[i].shape, generator=g)
        else:
            fill = torch.from_numpy(cv2.blur(images[i, 0].numpy(), (31, 31)))[None]
        out[i][outside] = fill[outside]
    return out


def randomise_acquisition(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator, strength: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply each nuisance to a random share of the batch (``strength`` scales every share)."""
    g = generator
    b = images.shape[0]

    def pick(p: float) -> torch.Tensor:
        return _chosen(b, p * strength, g)

    images, masks = random_letterbox(images, masks, g, pick(0.25))
    images = replace_outside_lungs(images, masks[:, :1], g, pick(0.15))
    sel = pick(0.6)
    if bool(sel.any()):
        images[sel] = random_tone_curve(images[sel], g)
    sel = pick(0.4)
    if bool(sel.any()):
        images[sel] = random_blur_or_sharpen(images[sel], g)
    sel = pick(0.2)
    if bool(sel.any()):
        images[sel] = random_resample(images[sel], g)
    per_image = ((0.15, equalise), (0.3, burned_in_text), (0.25, jpeg_artefacts))
    for p, transform in per_image:
        for i in torch.nonzero(pick(p)).flatten().tolist():
            images[i] = transform(images[i], g)
    sel = pick(0.35)
    if bool(sel.any()):
        images[sel] = random_noise(images[sel], g)
    return images, masks
