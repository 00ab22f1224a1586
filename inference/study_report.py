"""One-page study report (PNG or PDF): the four panels, class probabilities, infection per lung,
severity, the reading and who signed it, the model version and the decision-support notice.

Drawn with matplotlib's object API (no pyplot state, so it is safe in Streamlit's threads).
Callers: the Review page (``services.study_report``, with the reading) and the batch command
(``python -m inference.batch --report``, the model's output only).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from inference.overlay import INFECTION_COLOR, LUNG_COLOR, heatmap_overlay, mask_overlay
from inference.severity import SCALE_NAME
from settings import DECISION_SUPPORT_NOTICE

PANEL_SIDE = 640  # px: the report's panels are at most this big (the page is ~A4)
FORMATS = ("png", "pdf")


@dataclass(frozen=True)
class ReportContent:
    title: str  # e.g. "Study #12" (never a file name from an upload in the app)
    pixels: np.ndarray  # float32 (H, W) in [0, 1], display-ready
    lung_mask: np.ndarray
    infection_mask: np.ndarray
    gradcam: np.ndarray  # float32 (H, W) in [0, 1]
    gradcam_class: str
    probabilities: Mapping[str, float]
    predicted_class: str
    infection_percent: float
    infection_percent_left: float
    infection_percent_right: float
    severity: str
    severity_score: int
    model_version: str
    masks_source: str  # whose masks the figures come from
    reading: str | None = None  # "COVID-19 · approved by ... (radiologist), <time>"
    made: datetime | None = None


def _small(image: np.ndarray, interpolation: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = min(1.0, PANEL_SIDE / max(h, w))
    if scale == 1.0:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=interpolation)


def panels(content: ReportContent, opacity: float = 0.4) -> list[np.ndarray]:
    """X-ray, lung overlay, infection overlay, Grad-CAM overlay (uint8 RGB, reduced)."""
    base = np.clip(_small(np.asarray(content.pixels, np.float32), cv2.INTER_AREA), 0.0, 1.0)

    def mask(m: np.ndarray) -> np.ndarray:
        return _small(np.asarray(m, np.uint8), cv2.INTER_NEAREST).astype(bool)

    cam = cv2.resize(np.asarray(content.gradcam, np.float32), base.shape[::-1],
                     interpolation=cv2.INTER_LINEAR)  # any grid: the page's may be reduced
    gray = np.repeat((base * 255.0 + 0.5).astype(np.uint8)[..., None], 3, axis=2)
    return [
        gray,
        mask_overlay(base, mask(content.lung_mask), LUNG_COLOR, opacity),
        mask_overlay(base, mask(content.infection_mask), INFECTION_COLOR, opacity),
        heatmap_overlay(base, cam, opacity),
    ]


def figure(content: ReportContent) -> Figure:
    """The report page (A4 landscape) as a matplotlib figure."""
    fig = Figure(figsize=(11.69, 8.27), dpi=110)
    FigureCanvasAgg(fig)
    made = (content.made or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    fig.suptitle(f"InfMap study report: {content.title}", x=0.02, ha="left", fontsize=16,
                 fontweight="bold")
    fig.text(0.98, 0.955, f"Model {content.model_version} · made {made}", ha="right",
             fontsize=9, color="0.3")
    titles = ("X-ray", "Lung mask", "Infection mask", f"Grad-CAM: {content.gradcam_class}")
    for i, (panel, title) in enumerate(zip(panels(content), titles, strict=True)):
        ax = fig.add_axes((0.02 + i * 0.245, 0.42, 0.23, 0.48))
        ax.imshow(panel)
        ax.set_title(title, fontsize=11)
        ax.set_axis_off()
        h, w = panel.shape[:2]
        for x, text in ((0.03 * w, "R"), (0.97 * w, "L")):  # patient's right on the image left
            ax.text(x, 0.05 * h, text, color="yellow", fontsize=10, fontweight="bold",
                    ha="center", va="center")

    bars = fig.add_axes((0.10, 0.12, 0.24, 0.22))
    names = list(content.probabilities)
    values = [float(content.probabilities[n]) for n in names]
    bars.barh(names[::-1], values[::-1], color=["#888" if n != content.predicted_class
                                                 else "#d62728" for n in names[::-1]])
    bars.set_xlim(0, 1)
    bars.set_title(f"Class probabilities (predicted: {content.predicted_class})", fontsize=10)
    for bar, v in enumerate(values[::-1]):
        bars.text(min(v + 0.02, 0.85), bar, f"{v:.2f}", va="center", fontsize=9)

    lines = [
        ("Infection, both lungs", f"{content.infection_percent:.1f} %"),
        ("Patient's right lung", f"{content.infection_percent_right:.1f} %"),
        ("Patient's left lung", f"{content.infection_percent_left:.1f} %"),
        ("Severity", f"{content.severity} ({content.severity_score}/8)"),
        ("Scale", SCALE_NAME),
        ("Masks", content.masks_source),
        ("Reading", content.reading or "none recorded"),
    ]
    for row, (label, value) in enumerate(lines):
        y = 0.34 - row * 0.037
        fig.text(0.40, y, label, fontsize=10, fontweight="bold")
        fig.text(0.56, y, value, fontsize=10 if len(value) < 60 else 8)
    fig.text(0.02, 0.03, DECISION_SUPPORT_NOTICE, fontsize=9, color="#8b0000", wrap=True)
    return fig


def render(content: ReportContent, fmt: str = "png") -> bytes:
    """The report as PNG or PDF bytes: one page."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    fig = figure(content)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, metadata={"Creator": "InfMap"} if fmt == "pdf" else None)
    return buffer.getvalue()
