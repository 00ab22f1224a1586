"""Letterbox + normalise an X-ray for the network, and map network outputs back exactly.

The network sees a ``size x size`` square: the image is scaled so its longer side is ``size``,
centred, and padded with 0 (air, the dark value). :class:`Letterbox` remembers that geometry so a
map on the square grid goes back to the original ``H x W`` grid: crop the padding, resize.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Letterbox:
    """Geometry of one letterbox: original shape, scaled content shape and its offset."""

    orig_h: int
    orig_w: int
    size: int
    new_h: int
    new_w: int
    top: int
    left: int

    @classmethod
    def fit(cls, orig_h: int, orig_w: int, size: int) -> Letterbox:
        if orig_h < 1 or orig_w < 1:
            raise ValueError(f"empty image {orig_h}x{orig_w}")
        scale = size / max(orig_h, orig_w)
        # The longer side is exactly ``size``; the shorter one rounds but never vanishes.
        new_h = size if orig_h >= orig_w else max(1, min(size, round(orig_h * scale)))
        new_w = size if orig_w >= orig_h else max(1, min(size, round(orig_w * scale)))
        return cls(orig_h, orig_w, size, new_h, new_w, (size - new_h) // 2, (size - new_w) // 2)

    @property
    def is_identity(self) -> bool:
        return self.orig_h == self.size and self.orig_w == self.size

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Original-grid 2-D image -> ``size x size`` float32 square (padding 0)."""
        image = np.asarray(image, dtype=np.float32)
        if image.shape != (self.orig_h, self.orig_w):
            raise ValueError(f"expected shape {(self.orig_h, self.orig_w)}, got {image.shape}")
        if self.is_identity:
            return image.copy()
        shrinking = self.new_h <= self.orig_h and self.new_w <= self.orig_w
        # INTER_AREA averages when shrinking (no aliasing); it degrades to blocky nearest-like
        # output when enlarging, so small inputs are enlarged bilinearly instead.
        interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        content = cv2.resize(image, (self.new_w, self.new_h), interpolation=interp)
        out = np.zeros((self.size, self.size), np.float32)
        out[self.top : self.top + self.new_h, self.left : self.left + self.new_w] = content
        return out

    def crop(self, square: np.ndarray) -> np.ndarray:
        """Drop the padding of a ``size x size`` (or ``... x size x size``) map."""
        if square.shape[-2:] != (self.size, self.size):
            raise ValueError(f"expected a {self.size}x{self.size} map, got {square.shape}")
        return square[..., self.top : self.top + self.new_h, self.left : self.left + self.new_w]

    def to_original(self, square: np.ndarray) -> np.ndarray:
        """Continuous map (probabilities, CAM) on the square grid -> float32 (H, W), bilinear."""
        content = np.ascontiguousarray(self.crop(np.asarray(square, dtype=np.float32)))
        if content.shape == (self.orig_h, self.orig_w):
            return content.copy()
        return cv2.resize(content, (self.orig_w, self.orig_h), interpolation=cv2.INTER_LINEAR)

    def mask_to_original(self, square_prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        """Probability map on the square grid -> bool mask on the original grid.

        Thresholding after the bilinear resize gives smooth edges at the original resolution,
        instead of blowing up the network's pixel staircase.
        """
        return self.to_original(square_prob) > threshold


def to_float_pixels(pixels: np.ndarray) -> np.ndarray:
    """Accept float [0, 1] (the contract) or uint8/uint16 grayscale; return float32 (H, W)."""
    arr = np.asarray(pixels)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    out = arr.astype(np.float32, copy=False)
    if not np.isfinite(out).all():
        raise ValueError("image contains NaN or infinite values")
    return np.clip(out, 0.0, 1.0)


def normalise(square: np.ndarray, mean: float, std: float) -> np.ndarray:
    """The training input convention: ``(x - mean) / std`` (see training.train.normalise)."""
    return (square - np.float32(mean)) / np.float32(std)


def preprocess(
    pixels: np.ndarray, size: int, mean: float, std: float
) -> tuple[np.ndarray, Letterbox]:
    """2-D image -> normalised float32 ``(size, size)`` network input and its letterbox."""
    image = to_float_pixels(pixels)
    box = Letterbox.fit(image.shape[0], image.shape[1], size)
    return normalise(box.apply(image), mean, std), box
