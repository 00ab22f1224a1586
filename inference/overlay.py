"""RGB overlays of masks and heat maps on an X-ray (OpenCV; arrays are RGB, not BGR)."""

from __future__ import annotations

import cv2
import numpy as np

LUNG_COLOR: tuple[int, int, int] = (0, 170, 255)
INFECTION_COLOR: tuple[int, int, int] = (255, 60, 40)


def to_uint8_rgb(pixels: np.ndarray) -> np.ndarray:
    """Grayscale float [0, 1] (or uint8) (H, W), or an RGB image, -> uint8 (H, W, 3)."""
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8:
        arr = np.rint(np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] == 3:
        return arr.copy()
    raise ValueError(f"expected (H, W) or (H, W, 3), got shape {arr.shape}")


def _line_width(shape: tuple[int, ...]) -> int:
    # ~2 px on a 1000 px image, so contours stay visible on big DICOMs and thin on 256 px PNGs
    return max(1, round(max(shape[:2]) / 500))


def _check_shape(base: np.ndarray, other: np.ndarray, what: str) -> None:
    if other.shape[:2] != base.shape[:2]:
        raise ValueError(f"{what} shape {other.shape[:2]} != image shape {base.shape[:2]}")


def mask_overlay(
    pixels: np.ndarray,
    mask: np.ndarray,
    color: tuple[int, int, int] = INFECTION_COLOR,
    opacity: float = 0.4,
) -> np.ndarray:
    """Tint ``mask`` with ``color`` (r, g, b) at ``opacity`` and outline it; uint8 (H, W, 3)."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    out = to_uint8_rgb(pixels)
    region = np.asarray(mask, dtype=bool)
    _check_shape(out, region, "mask")
    if region.any():
        tint = np.asarray(color, np.float32)
        blended = out[region].astype(np.float32) * (1.0 - opacity) + tint * opacity
        out[region] = np.rint(blended).astype(np.uint8)
        contours, _ = cv2.findContours(
            region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        # The contour is drawn at full strength so the boundary reads even at low opacity.
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), _line_width(out.shape))
    return out


def heatmap_overlay(
    pixels: np.ndarray, cam: np.ndarray, opacity: float = 0.4
) -> np.ndarray:
    """Blend a [0, 1] map (Grad-CAM) as a JET colour map over the image; uint8 (H, W, 3)."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    base = to_uint8_rgb(pixels)
    cam = np.asarray(cam, dtype=np.float32)
    _check_shape(base, cam, "heat map")
    levels = np.rint(np.clip(cam, 0.0, 1.0) * 255.0).astype(np.uint8)
    heat = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(base, 1.0 - opacity, heat, opacity, 0.0)
