"""Pictures for the pages: window/level presets, the four review panels, charts, thumbnails.

Everything is computed from arrays already at hand (the stored X-ray and prediction): changing
the window, the opacity or the Grad-CAM class never runs the segmentation model again.
Large images are reduced once to a display grid (``DISPLAY_MAX_SIDE``) before overlays are
drawn; the plotly axes stay in original pixel coordinates (``dx``/``dy`` = the reduction).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import cv2
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from inference.overlay import INFECTION_COLOR, LUNG_COLOR, heatmap_overlay, mask_overlay

DISPLAY_MAX_SIDE = 768
THUMB_MAX_SIDE = 96
PANEL_TITLES = ("X-ray", "Lung mask", "Infection mask", "Grad-CAM")
# What a table cell shows for a missing value (st.dataframe's placeholder; Streamlit's own
# default is the word "None").
MISSING = "—"
CLASS_COLORS = {"COVID-19": "#e4572e", "Non-COVID": "#f3a712", "Normal": "#29bf12"}

# Window presets as (centre, width) fractions of the raw range (0.5th-99.5th percentile), on
# the display scale where air is dark: an X-ray has no Hounsfield units, so CT presets in HU do
# not apply. Lung fields sit around the middle of that scale, the mediastinum above it and bone
# near the bright end (checked on the RG1 CR of pydicom-data and COVID-QU-Ex PNGs).
RELATIVE_PRESETS: dict[str, tuple[float, float]] = {
    "Lung": (0.48, 0.70),
    "Mediastinum": (0.72, 0.45),
    "Bone": (0.85, 0.35),
    "Full range": (0.50, 1.00),
}


# ----------------------------------------------------------------------------- window / level
def raw_range(raw: np.ndarray) -> tuple[float, float]:
    """Robust (low, high) of the raw pixel values: 0.5th and 99.5th percentiles."""
    sample = raw[:: max(1, raw.shape[0] // 512), :: max(1, raw.shape[1] // 512)]
    lo, hi = np.percentile(sample, [0.5, 99.5])
    lo, hi = float(lo), float(hi)
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def window_presets(
    raw: np.ndarray, header_window: tuple[float, float] | None, invert: bool
) -> dict[str, tuple[float, float]]:
    """Named (centre, width) windows in raw units; "Header" first when the file has one.

    ``invert`` (MONOCHROME1: high raw values are air) mirrors the relative centres so "Lung"
    still means the dark end of the displayed image.
    """
    lo, hi = raw_range(raw)
    span = hi - lo
    presets: dict[str, tuple[float, float]] = {}
    if header_window is not None:
        presets["Header"] = (float(header_window[0]), float(max(header_window[1], 1e-6)))
    for name, (c, w) in RELATIVE_PRESETS.items():
        centre = 1.0 - c if invert else c
        presets[name] = (lo + centre * span, w * span)
    return presets


# ----------------------------------------------------------------------------- display grid
@dataclass(frozen=True)
class DisplayGrid:
    height: int  # original image grid
    width: int
    scale: float  # display pixels per original pixel (<= 1)

    @property
    def shape(self) -> tuple[int, int]:
        return max(1, round(self.height * self.scale)), max(1, round(self.width * self.scale))

    @classmethod
    def for_shape(cls, height: int, width: int, max_side: int = DISPLAY_MAX_SIDE) -> DisplayGrid:
        return cls(height, width, min(1.0, max_side / max(height, width)))

    def image(self, arr: np.ndarray) -> np.ndarray:
        """Continuous image (float or uint8, 2-D or RGB) -> display grid (area averaging)."""
        h, w = self.shape
        if arr.shape[:2] == (h, w):
            return arr
        return cv2.resize(arr, (w, h), interpolation=cv2.INTER_AREA)

    def mask(self, mask: np.ndarray) -> np.ndarray:
        h, w = self.shape
        if mask.shape == (h, w):
            return mask.astype(bool)
        return cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) >= 0.5


def panel_images(
    pixels: np.ndarray,
    lung_mask: np.ndarray,
    infection_mask: np.ndarray,
    gradcam: np.ndarray,
    opacity: float,
    grid: DisplayGrid | None = None,
) -> list[np.ndarray]:
    """The four uint8 RGB panels (X-ray, lung overlay, infection overlay, Grad-CAM) on ``grid``."""
    grid = grid or DisplayGrid.for_shape(*pixels.shape)
    small = np.clip(grid.image(np.asarray(pixels, np.float32)), 0.0, 1.0)
    gray = np.repeat((small * 255.0 + 0.5).astype(np.uint8)[..., None], 3, axis=2)
    return [
        gray,
        mask_overlay(small, grid.mask(lung_mask), LUNG_COLOR, opacity),
        mask_overlay(small, grid.mask(infection_mask), INFECTION_COLOR, opacity),
        heatmap_overlay(small, grid.image(np.asarray(gradcam, np.float32)), opacity),
    ]


# ----------------------------------------------------------------------------- encoding
def png_bytes(rgb: np.ndarray) -> bytes:
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    bgr = arr[..., ::-1] if arr.ndim == 3 else arr
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(bgr), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:  # pragma: no cover
        raise ValueError("could not encode PNG")
    return buf.tobytes()


def png_data_uri(rgb: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode("ascii")


def thumbnail_uri(pixels: np.ndarray, max_side: int = THUMB_MAX_SIDE) -> str:
    height, width = pixels.shape[:2]
    grid = DisplayGrid.for_shape(height, width, max_side=max_side)
    return png_data_uri(np.clip(grid.image(np.asarray(pixels, np.float32)), 0.0, 1.0))


# ----------------------------------------------------------------------------- figures
def panels_figure(
    panels: list[np.ndarray],
    grid: DisplayGrid,
    titles: tuple[str, ...] = PANEL_TITLES,
    height: int | None = None,
    panel_width: int = 290,
) -> go.Figure:
    """One 1 x N plotly figure; zoom and pan in any panel move all of them (matched axes).

    ``height`` defaults to what a panel ``panel_width`` pixels wide needs for this image's
    aspect ratio (the wide layout on a laptop screen), so there is little empty space.
    """
    n = len(panels)
    if height is None:
        aspect = grid.height / grid.width
        height = int(min(max(panel_width * aspect, 200), 720)) + 34
    fig = make_subplots(rows=1, cols=n, subplot_titles=titles[:n], horizontal_spacing=0.008)
    step = 1.0 / grid.scale
    for col, rgb in enumerate(panels, start=1):
        fig.add_trace(
            go.Image(
                source=png_data_uri(rgb),
                x0=step / 2 - 0.5,  # pixel centres in original coordinates
                y0=step / 2 - 0.5,
                dx=step,
                dy=step,
                hovertemplate="x %{x:.0f}, y %{y:.0f}<extra></extra>",
                name=titles[col - 1] if col - 1 < len(titles) else f"panel {col}",
            ),
            row=1,
            col=col,
        )
    if n >= 4:  # the Grad-CAM panel: what its colours mean (cv2's JET, as heatmap_overlay)
        fig.add_trace(
            go.Scatter(
                x=[None], y=[None], mode="markers", hoverinfo="skip", showlegend=False,
                marker={
                    "colorscale": "Jet", "cmin": 0.0, "cmax": 1.0, "color": [0.0],
                    "showscale": True,
                    "colorbar": {
                        "title": {"text": "class evidence", "side": "right"},
                        "tickvals": [0, 1], "ticktext": ["low", "high"],
                        "thickness": 10, "len": 0.8, "x": 1.0, "xpad": 4,
                    },
                },
            ),
            row=1, col=4,
        )  # fmt: skip
    hidden = {"showticklabels": False, "showgrid": False, "zeroline": False, "ticks": ""}
    fig.update_xaxes(matches="x", constrain="domain", **hidden)
    fig.update_yaxes(matches="y", autorange="reversed", constrain="domain", **hidden)
    fig.update_yaxes(scaleanchor="x", scaleratio=1, row=1, col=1)
    # Orientation: on a frontal (PA/AP) view the patient's right is on the image's left.
    for col in range(1, n + 1):
        axis = "" if col == 1 else str(col)
        for text, x, anchor in (("R", 0.01, "left"), ("L", 0.99, "right")):
            fig.add_annotation(
                text=f"<b>{text}</b>", x=x, y=0.99, xref=f"x{axis} domain",
                yref=f"y{axis} domain", xanchor=anchor, yanchor="top", showarrow=False,
                font={"color": "#ffd60a", "size": 13},
            )  # fmt: skip
    fig.update_layout(
        height=height + 26,
        # the top margin leaves the mode bar its own row above the panel titles
        margin={"l": 0, "r": 56 if n >= 4 else 0, "t": 54, "b": 0},
        dragmode="pan",
        hovermode="closest",
        uirevision="panels",  # keep zoom/pan across reruns (window, opacity changes)
    )
    return fig


def probabilities_figure(probabilities: dict[str, float], height: int = 180) -> go.Figure:
    names = list(probabilities)
    values = [float(probabilities[n]) for n in names]
    fig = go.Figure(
        go.Bar(
            x=values,
            y=names,
            orientation="h",
            marker_color=[CLASS_COLORS.get(n, "#888888") for n in names],
            text=[f"{v:.1%}" for v in values],
            textposition="outside",  # never squeezed (or turned) into a thin bar
            textangle=0,
            cliponaxis=False,
            hovertemplate="%{y}: %{x:.1%}<extra></extra>",
        )
    )
    fig.update_layout(
        height=height,
        margin={"l": 0, "r": 48, "t": 10, "b": 0},
        xaxis={"range": [0, 1], "tickformat": ".0%", "title": None},
        yaxis={"autorange": "reversed", "title": None},
        showlegend=False,
    )
    return fig


def mask_on_xray(
    pixels: np.ndarray,
    mask: np.ndarray,
    color: tuple[int, int, int],
    opacity: float,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """X-ray with one mask composited, optionally resized to ``size`` = (height, width)."""
    pixels = np.asarray(pixels, np.float32)
    mask = np.asarray(mask, bool)
    if size is not None and size != pixels.shape:
        h, w = size
        interp = cv2.INTER_AREA if h < pixels.shape[0] else cv2.INTER_LINEAR
        pixels = np.clip(cv2.resize(pixels, (w, h), interpolation=interp), 0.0, 1.0)
        mask = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) >= 0.5
    return mask_overlay(pixels, mask, color, opacity)
