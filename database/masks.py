"""Binary masks <-> PNG bytes (single channel, 0/255): small, lossless, viewable anywhere."""

from __future__ import annotations

import cv2
import numpy as np


class MaskError(ValueError):
    """The bytes or array are not a usable 2-D mask."""


def mask_to_png(mask: np.ndarray) -> bytes:
    """Encode a 2-D mask (bool, or numbers where non-zero means inside) as a 0/255 PNG."""
    arr = np.asarray(mask)
    if arr.ndim != 2 or arr.size == 0:
        raise MaskError(f"a mask must be a non-empty 2-D array, got shape {arr.shape}")
    ok, buf = cv2.imencode(".png", np.where(arr.astype(bool), 255, 0).astype(np.uint8))
    if not ok:  # pragma: no cover - OpenCV only fails on impossible shapes
        raise MaskError("could not encode the mask as PNG")
    return buf.tobytes()


def png_to_mask(data: bytes, threshold: int = 127) -> np.ndarray:
    """Decode PNG (or any image OpenCV reads) bytes to a bool (H, W) mask: pixel > threshold.

    A 0/1 mask (maximum 1) is read as non-zero = inside rather than coming back empty.
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(raw, cv2.IMREAD_GRAYSCALE) if raw.size else None
    if img is None:
        raise MaskError("the bytes are not a readable image")
    return img > (threshold if img.max(initial=0) > 1 else 0)


def read_mask_file(path: str) -> np.ndarray:
    """Read a mask image file (0/255 PNG) as a bool array."""
    with open(path, "rb") as fh:
        return png_to_mask(fh.read())


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to (height, width)."""
    out = cv2.resize(
        mask.astype(np.uint8), (int(width), int(height)), interpolation=cv2.INTER_NEAREST
    )
    return out.astype(bool)
