"""Predictions: the model's output stored once per (image, model version).

Every function takes a Session; the caller owns the transaction.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from database.masks import mask_to_png, png_to_mask
from database.models import Image, ModelVersion, Prediction


class PredictionLike(Protocol):
    """The attributes of ``inference.predict.Prediction`` that are stored."""

    class_names: list[str]
    probabilities: dict[str, float]
    predicted_class: str
    lung_mask: np.ndarray
    infection_mask: np.ndarray
    infection_percent: float
    infection_percent_left: float
    infection_percent_right: float
    severity: str
    severity_score: int
    model_version: str
    uncertainty: float
    timings_ms: dict[str, float]
    # ood_score: float | None and in_domain: bool | None are read when present (getattr):
    # a prediction without them is stored as not scored.


def _domain_fields(prediction: object) -> tuple[float | None, bool | None]:
    score = getattr(prediction, "ood_score", None)
    flag = getattr(prediction, "in_domain", None)
    return (None if score is None else float(score)), (None if flag is None else bool(flag))


def store_prediction(
    session: Session, image_id: int, model_version_id: int, prediction: PredictionLike
) -> Prediction:
    """Store the model's output once per (image, model version); a repeat returns the first.

    Stored: probabilities, class, both masks (PNG), infection %, severity, uncertainty, timings,
    the out-of-domain score and flag (None: not scored).
    Not stored: the probability maps and Grad-CAM (recomputed on demand).
    """
    existing = get_prediction(session, image_id, model_version_id)
    if existing is not None:
        return existing
    image = session.get(Image, image_id)
    if image is None:
        raise LookupError(f"no image {image_id}")
    version = session.get(ModelVersion, model_version_id)
    if version is None:
        raise LookupError(f"no model version {model_version_id}")
    made_by = getattr(prediction, "model_version", None)
    if made_by is not None and made_by != version.version:
        raise ValueError(f"the prediction was made by model {made_by!r}, not {version.version!r}")
    for name in ("lung_mask", "infection_mask"):
        shape = np.shape(getattr(prediction, name))
        if shape != (image.height, image.width):
            raise ValueError(f"{name} has shape {shape}, the image is {image.height}x{image.width}")
    names = list(prediction.class_names) or list(prediction.probabilities)
    probabilities = {n: float(prediction.probabilities[n]) for n in names}
    ood_score, in_domain = _domain_fields(prediction)
    row = Prediction(
        image_id=image_id,
        model_version_id=model_version_id,
        probabilities=probabilities,
        predicted_class=prediction.predicted_class,
        confidence=probabilities[prediction.predicted_class],
        lung_mask_png=mask_to_png(prediction.lung_mask),
        infection_mask_png=mask_to_png(prediction.infection_mask),
        infection_percent=float(prediction.infection_percent),
        infection_percent_left=float(prediction.infection_percent_left),
        infection_percent_right=float(prediction.infection_percent_right),
        severity=str(prediction.severity),
        severity_score=int(prediction.severity_score),
        uncertainty=float(prediction.uncertainty),
        timings={k: float(v) for k, v in dict(prediction.timings_ms or {}).items()},
        ood_score=ood_score,
        in_domain=in_domain,
    )
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:  # stored concurrently by another session
        stored = get_prediction(session, image_id, model_version_id)
        if stored is None:
            raise
        return stored
    return row


def set_domain(
    session: Session, prediction_id: int, ood_score: float, in_domain: bool
) -> Prediction:
    """Fill in the out-of-domain score of a prediction stored without one (before revision 0003).

    The only change ever made to a stored prediction, and only from "not scored": a scored
    prediction is never re-scored (``ValueError``), so what a reader saw stays what is stored.
    """
    row = session.get(Prediction, prediction_id)
    if row is None:
        raise LookupError(f"no prediction {prediction_id}")
    if row.ood_score is not None:
        raise ValueError(f"prediction {prediction_id} already has an out-of-domain score")
    row.ood_score, row.in_domain = float(ood_score), bool(in_domain)
    session.flush()
    return row


def get_prediction(session: Session, image_id: int, model_version_id: int) -> Prediction | None:
    return session.scalar(
        select(Prediction).where(
            Prediction.image_id == image_id, Prediction.model_version_id == model_version_id
        )
    )


def prediction_masks(pred_row: Prediction) -> tuple[np.ndarray, np.ndarray]:
    """(lung mask, infection mask) as bool arrays on the image grid."""
    return png_to_mask(pred_row.lung_mask_png), png_to_mask(pred_row.infection_mask_png)

