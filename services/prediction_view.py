"""A stored prediction as the pages show it: ``PredictionView`` (a plain, picklable value), the
out-of-domain verdict in words, the calibration note, Grad-CAM for a chosen class and the
infection numbers of a mask pair. ``services.studies`` reads stored predictions into these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from database import predictions
from inference.gradcam import gradcam
from inference.model import LoadedModel
from inference.onnx_engine import forward_pass
from inference.predict import infection_percentages
from inference.preprocess import preprocess
from inference.severity import SCALE_NAME, severity


@dataclass(frozen=True)
class PredictionView:
    prediction_id: int
    model_version: str
    probabilities: dict[str, float]
    predicted_class: str
    confidence: float
    lung_mask: np.ndarray
    infection_mask: np.ndarray
    infection_percent: float
    infection_percent_left: float
    infection_percent_right: float
    severity: str
    severity_score: int
    uncertainty: float
    timings_ms: dict[str, float]
    ood_score: float | None = None  # None: not scored (see database.predictions)
    in_domain: bool | None = None


def prediction_view(row: Any, version: str) -> PredictionView:
    """A stored prediction row (``database.predictions``) as a plain value."""
    lung, infection = predictions.prediction_masks(row)
    return PredictionView(
        prediction_id=row.id,
        model_version=version,
        probabilities={k: float(v) for k, v in dict(row.probabilities).items()},
        predicted_class=row.predicted_class,
        confidence=float(row.confidence),
        lung_mask=lung,
        infection_mask=infection,
        infection_percent=float(row.infection_percent),
        infection_percent_left=float(row.infection_percent_left),
        infection_percent_right=float(row.infection_percent_right),
        severity=row.severity,
        severity_score=int(row.severity_score),
        uncertainty=float(row.uncertainty),
        timings_ms=dict(row.timings or {}),
        ood_score=None if row.ood_score is None else float(row.ood_score),
        in_domain=None if row.in_domain is None else bool(row.in_domain),
    )


# ----------------------------------------------------------------------------- domain
@dataclass(frozen=True)
class DomainVerdict:
    """Whether to trust the model on a study, in words a reader understands."""

    state: str  # "in" | "out" | "unscored"
    headline: str
    detail: str


def domain_verdict(pred: PredictionView, threshold: float | None) -> DomainVerdict:
    """The out-of-domain score and its threshold in plain words (``threshold``: the active
    checkpoint's ``calibration.ood_threshold``; None when the model is not loaded or has none)."""
    limit = (
        f"the limit is {threshold:.2f}: 95% of the validation X-rays score at or below it"
        if threshold is not None
        else "the limit is not known (the model is not loaded)"
    )
    if pred.ood_score is None or pred.in_domain is None:
        return DomainVerdict(
            "unscored",
            "Not checked against the training images",
            "This model version has no out-of-domain reference, so nobody can say whether "
            "this image is like the X-rays it was trained on.",
        )
    score = f"Out-of-domain score {pred.ood_score:.2f} ({limit})"
    if pred.in_domain:
        return DomainVerdict(
            "in",
            "Like the training images",
            f"{score}. Higher means further from the chest X-rays the model was trained on.",
        )
    return DomainVerdict(
        "out",
        "Out of domain: do not trust the model's class or severity",
        f"This image is unlike the chest X-rays the model was trained on. {score}. On such "
        "images the model's class probabilities, infection % and severity have no known "
        "accuracy: the class is therefore not called. The masks are still shown so that they "
        "can be checked and corrected.",
    )


DOMAIN_LABELS = {True: "yes", False: "no: out of domain", None: "not scored"}


def calibration_note(temperature: float | None, covid_threshold: float | None) -> str:
    """How the shown probabilities and the class call are made, in one sentence each."""
    if temperature is None:
        return "Class probabilities as stored with the prediction."
    if temperature == 1.0 and covid_threshold is None:  # a checkpoint without calibration
        return "Class probabilities: the model's plain softmax (this version is not calibrated)."
    parts = [
        f"Calibrated probabilities: the model's scores are softened by a temperature of "
        f"{temperature:.2f} fitted on the COVID-QU-Ex validation split, so that on those "
        "images a 70% is right about 70% of the time."
    ]
    if covid_threshold is not None:
        parts.append(
            f"COVID-19 is called when its probability is at least {covid_threshold:.2f} "
            "(chosen on validation), otherwise the likelier of the other two classes."
        )
    return " ".join(parts)


def gradcam_for(pixels: np.ndarray, model: LoadedModel, class_name: str) -> np.ndarray:
    """Grad-CAM of ``class_name`` on the original grid, as ``inference.predict`` computes it
    (the forward pass under ``INFMAP_ENGINE`` + ``inference.gradcam.gradcam``) for a class of the
    user's choice."""
    config = model.config
    names = list(config.class_names)
    if class_name not in names:
        raise ValueError(f"unknown class {class_name!r}; expected one of {names}")
    net = model.model
    if net.training:  # dropout and batch statistics would change the map
        net.eval()
    x, box = preprocess(pixels, config.input_size, config.norm_mean, config.norm_std)
    param = next(net.parameters())
    tensor = torch.from_numpy(x)[None, None].to(device=param.device, dtype=param.dtype)
    forward = forward_pass(model)  # torch or ONNX Runtime: the same head feature map
    with torch.inference_mode():
        features = forward(tensor).head_map
    return gradcam(net, features, names.index(class_name), box)


# ----------------------------------------------------------------------------- numbers
@dataclass(frozen=True)
class InfectionSummary:
    percent: float
    percent_left: float  # patient's left
    percent_right: float
    severity: str
    severity_score: int
    scale: str = SCALE_NAME


def infection_summary(lung_mask: np.ndarray, infection_mask: np.ndarray) -> InfectionSummary:
    both, left, right = infection_percentages(lung_mask, infection_mask)
    sev = severity(left, right)
    return InfectionSummary(both, left, right, sev.grade, sev.score)
