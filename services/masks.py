"""Masks edited on a drawing canvas: strokes -> mask on the image grid, and how alike two masks are.

The correction canvas (streamlit-drawable-canvas) shows the X-ray with the current mask composited
underneath, at a display size (``canvas_size``). The annotator paints in two reserved colours:
``ADD_COLOR`` strokes/polygons add to the mask, ``ERASE_COLOR`` ones remove from it. The canvas
returns only its drawing layer (RGBA, canvas size, background not included); later strokes are
painted over earlier ones, so "erase then add again" works as it looks. ``composite_strokes``
classifies each opaque pixel to the nearer reserved colour, scales both layers back to the image
grid and applies them to the base mask. Unedited pixels keep the full resolution of the base mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

ADD_COLOR = "#00FF66"  # strokes that add to the mask
ERASE_COLOR = "#FF00FF"  # strokes that remove from the mask
STROKE_ALPHA = 0.6  # strokes are see-through so the anatomy stays visible under them
# A pixel belongs to a stroke from half the stroke's opacity (anti-aliased edges fade out).
_ALPHA_MIN = round(255 * STROKE_ALPHA / 2)
CANVAS_MAX_SIDE = 512


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    color = color.lstrip("#")
    return int(color[0:2], 16), int(color[2:4], 16), int(color[4:6], 16)


def canvas_color(color: str, alpha: float = STROKE_ALPHA) -> str:
    """A reserved colour as the CSS ``rgba(...)`` the canvas draws with."""
    r, g, b = hex_to_rgb(color)
    return f"rgba({r}, {g}, {b}, {alpha})"


def canvas_size(height: int, width: int, max_side: int = CANVAS_MAX_SIDE) -> tuple[int, int]:
    """(canvas_height, canvas_width): the image's aspect ratio, longer side ``max_side``."""
    if height < 1 or width < 1:
        raise ValueError(f"empty image {height}x{width}")
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def stroke_layers(rgba: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Canvas RGBA drawing layer -> (add, erase) bool masks at canvas size.

    Where see-through strokes overlap, the colour is a blend weighted towards the later
    stroke, so the nearer reserved colour is the one drawn last.
    """
    if rgba is None:
        return np.zeros((0, 0), bool), np.zeros((0, 0), bool)
    rgba = np.asarray(rgba)
    if rgba.ndim != 3 or rgba.shape[2] != 4:
        raise ValueError(f"expected an RGBA (H, W, 4) array, got shape {rgba.shape}")
    painted = rgba[..., 3] >= _ALPHA_MIN
    rgb = rgba[..., :3].astype(np.int32)
    add_d = ((rgb - np.array(hex_to_rgb(ADD_COLOR))) ** 2).sum(-1)
    erase_d = ((rgb - np.array(hex_to_rgb(ERASE_COLOR))) ** 2).sum(-1)
    add = painted & (add_d <= erase_d)
    erase = painted & (erase_d < add_d)
    return add, erase


def _to_grid(layer: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bool layer at canvas size -> bool at ``shape`` (bilinear then 0.5: smooth, not blocky)."""
    if layer.shape == shape:
        return layer.copy()
    resized = cv2.resize(
        layer.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR
    )
    return resized >= 0.5


def composite_strokes(base_mask: np.ndarray, rgba: np.ndarray | None) -> np.ndarray:
    """The edited mask: ``base_mask`` (H, W) with the canvas's add/erase strokes applied."""
    base = np.asarray(base_mask, dtype=bool)
    add, erase = stroke_layers(rgba)
    if not add.any() and not erase.any():
        return base.copy()
    add_g, erase_g = _to_grid(add, base.shape), _to_grid(erase, base.shape)
    return (base | add_g) & ~erase_g


def has_strokes(rgba: np.ndarray | None) -> bool:
    add, erase = stroke_layers(rgba)
    return bool(add.any() or erase.any())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """2|A∩B| / (|A|+|B|); two empty masks agree perfectly (1.0), as in training.metrics."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int((a & b).sum()) / total


def changed_pixels(a: np.ndarray, b: np.ndarray) -> int:
    return int((np.asarray(a, bool) ^ np.asarray(b, bool)).sum())


# ----------------------------------------------------------------------------- zoom and pan
ZOOMS = (1, 2, 4, 8)


@dataclass(frozen=True)
class View:
    """What part of the image the canvas shows: ``zoom`` times magnified around the centre
    (``cy``, ``cx``, fractions of the image). Strokes drawn on a zoomed canvas are applied to
    that window of the mask on the image's own grid, so at 4x a 2000-pixel X-ray is edited at
    its full resolution (the canvas shows its 500-pixel window on 512 canvas pixels)."""

    zoom: int = 1
    cy: float = 0.5
    cx: float = 0.5

    def window(self, shape: tuple[int, int]) -> tuple[slice, slice]:
        h, w = shape
        wh, ww = max(1, round(h / self.zoom)), max(1, round(w / self.zoom))
        y0 = min(max(0, round(self.cy * h - wh / 2)), h - wh)
        x0 = min(max(0, round(self.cx * w - ww / 2)), w - ww)
        return slice(y0, y0 + wh), slice(x0, x0 + ww)

    def zoomed(self, step: int) -> View:
        """One zoom level in (``step`` 1) or out (-1), about the same centre."""
        i = min(max(0, ZOOMS.index(self.zoom) + step), len(ZOOMS) - 1)
        return View(ZOOMS[i], self.cy, self.cx) if ZOOMS[i] > 1 else View()

    def panned(self, dy: int, dx: int, shape: tuple[int, int]) -> View:
        """Half a window up/down (``dy`` -1/1) or left/right (``dx``), kept inside the image."""
        ys, xs = self.window(shape)
        h, w = shape
        half_h, half_w = (ys.stop - ys.start) / h / 2, (xs.stop - xs.start) / w / 2
        cy = min(max(half_h, (ys.start + ys.stop) / 2 / h + dy * half_h), 1 - half_h)
        cx = min(max(half_w, (xs.start + xs.stop) / 2 / w + dx * half_w), 1 - half_w)
        return View(self.zoom, cy, cx)

    def describe(self, shape: tuple[int, int]) -> str:
        ys, xs = self.window(shape)
        if self.zoom == 1:
            return f"the whole image ({shape[1]}×{shape[0]} pixels)"
        return (f"{self.zoom}× zoom: columns {xs.start}–{xs.stop - 1}, rows {ys.start}–"
                f"{ys.stop - 1} of {shape[1]}×{shape[0]}")


def composite_in_view(base_mask: np.ndarray, rgba: np.ndarray | None, view: View) -> np.ndarray:
    """``composite_strokes`` for a canvas that shows ``view``'s window: the strokes change only
    that window, on the image's own grid; the rest of the mask is untouched."""
    base = np.asarray(base_mask, dtype=bool)
    ys, xs = view.window(base.shape)
    out = base.copy()
    out[ys, xs] = composite_strokes(base[ys, xs], rgba)
    return out
