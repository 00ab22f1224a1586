"""The Review page's study report: what the page shows (the masks read, their figures, the
model's probabilities and Grad-CAM) plus the current reading and who signed it, as one PNG/PDF
page (``inference.study_report``)."""

from __future__ import annotations

import numpy as np

from inference.study_report import ReportContent, render
from services import reading_labels
from services.ingest import SessionFactory
from services.studies import PredictionView, infection_summary, load_xray_payload

MIME = {"pdf": "application/pdf", "png": "image/png"}


def review_report(
    scope: SessionFactory,
    image_id: int,
    prediction: PredictionView,
    masks: dict[str, np.ndarray],
    masks_source: str,
    gradcam: np.ndarray,
    gradcam_class: str,
    fmt: str = "pdf",
) -> tuple[str, bytes, str]:
    """(file name, bytes, MIME type) of study ``image_id``'s report. ``masks`` are the masks
    shown (lung, infection); the figures are recomputed from them, as the page does."""
    xray = load_xray_payload(scope, image_id)
    summary = infection_summary(masks["lung"], masks["infection"])
    reading = reading_labels.current_readings(scope).get(image_id)
    content = ReportContent(
        title=f"Study #{image_id}",
        pixels=xray.pixels,
        lung_mask=masks["lung"],
        infection_mask=masks["infection"],
        gradcam=gradcam,
        gradcam_class=gradcam_class,
        probabilities=prediction.probabilities,
        predicted_class=prediction.predicted_class,
        infection_percent=summary.percent,
        infection_percent_left=summary.percent_left,
        infection_percent_right=summary.percent_right,
        severity=summary.severity,
        severity_score=summary.severity_score,
        model_version=prediction.model_version,
        masks_source=masks_source,
        reading=None if reading is None else reading.describe(),
    )
    return f"study-{image_id}-report.{fmt}", render(content, fmt), MIME[fmt]
