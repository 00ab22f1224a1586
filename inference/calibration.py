"""Post-hoc decisions fitted on COVID-QU-Ex Val (never Test, never external data), stored in the
checkpoint beside the weights: temperature, the COVID-19 decision rule, mask thresholds, lung
clean-up, and the out-of-domain (OOD) score's reference distribution and threshold.

The out-of-domain (OOD) score combines two Mahalanobis distances to the Train images, each with
a Ledoit-Wolf shrunk covariance:
- *content*: the pooled last-stage encoder features (``NetOutputs.embedding``'s leading columns:
  whole image and under the lungs), in the span of Train's top principal axes (so the checkpoint
  stays small). It flags what is not a chest X-ray: photographs, CT/MR, rotated or cropped films.
- *acquisition*: the per-channel mean and standard deviation of the early encoder stages (the
  trailing ``style_mean.shape[0]`` columns). The deep features are trained and augmented to
  ignore how an image was made, so they cannot see a new source; these statistics do (contrast,
  noise, sharpness, processing), in the spirit of feature-statistics shift detectors.
Each distance is divided by its own Val 95th percentile (``ood_scale``, ``style_scale``) and the
score is the larger of the two; ``in_domain`` is ``score <= ood_threshold``, the threshold being
the combined score that 95% of Val images stay below. Checkpoints without the acquisition part
(2.0.0 as first shipped) score with the content distance alone, unscaled. A checkpoint without
any OOD fields (1.0.0) gets :data:`IDENTITY` and ``None`` for the OOD fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch


@dataclass
class Calibration:
    temperature: float = 1.0  # class logits are divided by it before the softmax
    # COVID-19 when p(COVID-19) >= covid_threshold (after temperature); else the likelier of the
    # other classes. None: plain argmax.
    covid_threshold: float | None = None
    lung_threshold: float = 0.5
    infection_threshold: float = 0.5
    clean_lungs: bool = False  # keep the two largest lung components and fill their holes
    ood_mean: torch.Tensor | None = None  # (D,) float32
    ood_projection: torch.Tensor | None = None  # (D, k): Train's top-k principal axes
    ood_precision: torch.Tensor | None = None  # (k, k) float32, inverse shrunk covariance
    ood_scale: float = 1.0  # the content distance is divided by it
    style_mean: torch.Tensor | None = None  # (S,) float32: acquisition statistics of Train
    style_precision: torch.Tensor | None = None  # (S, S) float32
    style_scale: float = 1.0
    ood_threshold: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)  # how each value was chosen

    @property
    def has_ood(self) -> bool:
        return (self.ood_mean is not None and self.ood_precision is not None
                and self.ood_projection is not None)

    def to_payload(self) -> dict[str, Any]:
        """Tensors and JSON-like values only, so checkpoints load with ``weights_only=True``."""
        return {
            "temperature": float(self.temperature),
            "covid_threshold": self.covid_threshold,
            "lung_threshold": float(self.lung_threshold),
            "infection_threshold": float(self.infection_threshold),
            "clean_lungs": bool(self.clean_lungs),
            "ood_mean": self.ood_mean,
            "ood_projection": self.ood_projection,
            "ood_precision": self.ood_precision,
            "ood_scale": float(self.ood_scale),
            "style_mean": self.style_mean,
            "style_precision": self.style_precision,
            "style_scale": float(self.style_scale),
            "ood_threshold": self.ood_threshold,
            "notes": dict(self.notes),
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any] | None) -> Calibration:
        if not payload:
            return cls()
        known = {k: payload[k] for k in cls.__dataclass_fields__ if k in payload}
        for key in ("ood_mean", "ood_projection", "ood_precision", "style_mean",
                    "style_precision"):
            if known.get(key) is not None:
                known[key] = known[key].float()
        return cls(**known)


IDENTITY = Calibration()


def class_probabilities(logits: torch.Tensor, calibration: Calibration) -> torch.Tensor:
    """Temperature-scaled softmax, (B, C) float32."""
    return torch.softmax(logits.float() / calibration.temperature, dim=-1)


def decide(probs: np.ndarray, calibration: Calibration, covid_index: int = 0) -> np.ndarray:
    """The shipped decision rule: class index per row of ``probs`` (B, C)."""
    probs = np.atleast_2d(probs)
    if calibration.covid_threshold is None:
        return probs.argmax(1)
    others = probs.copy()
    others[:, covid_index] = -1.0
    return np.where(probs[:, covid_index] >= calibration.covid_threshold, covid_index,
                    others.argmax(1))


def clean_lung_mask(mask: np.ndarray) -> np.ndarray:
    """The two largest 8-connected components with their holes filled (lungs have no holes)."""
    mask = np.asarray(mask, dtype=np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return mask.astype(bool)
    keep = np.argsort(stats[1:, cv2.CC_STAT_AREA])[::-1][:2] + 1
    kept = np.isin(labels, keep).astype(np.uint8)
    contours, _ = cv2.findContours(kept, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros_like(kept)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled.astype(bool)


def binarise_masks(
    lung_prob: np.ndarray, infection_prob: np.ndarray, calibration: Calibration
) -> tuple[np.ndarray, np.ndarray]:
    """(lung, infection) bool masks; infection always inside the lungs. Works on (H, W)."""
    lungs = lung_prob > calibration.lung_threshold
    if calibration.clean_lungs:
        lungs = clean_lung_mask(lungs)
    return lungs, (infection_prob > calibration.infection_threshold) & lungs


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor,
                projection: torch.Tensor | None = None) -> torch.Tensor:
    """Distance of each row of ``x`` (B, D) to ``mean`` under ``precision`` (optionally after
    projecting the centred rows onto ``projection``'s columns)."""
    z = x.float() - mean
    if projection is not None:
        z = z @ projection
    return torch.einsum("bi,ij,bj->b", z, precision, z).clamp_min(0).sqrt()


def ood_scores(embedding: torch.Tensor, calibration: Calibration) -> np.ndarray | None:
    """The out-of-domain score of each row of ``embedding`` (B, D); None without OOD fields."""
    if not calibration.has_ood:
        return None
    mean, proj, prec = calibration.ood_mean, calibration.ood_projection, calibration.ood_precision
    assert mean is not None and proj is not None and prec is not None
    score = mahalanobis(embedding[:, : mean.shape[0]], mean, prec, proj) / calibration.ood_scale
    if calibration.style_mean is not None and calibration.style_precision is not None:
        style = embedding[:, -calibration.style_mean.shape[0] :]
        score = torch.maximum(score, mahalanobis(style, calibration.style_mean,
                                                 calibration.style_precision)
                              / calibration.style_scale)
    return score.double().numpy()


def in_domain(score: float | None, calibration: Calibration) -> bool | None:
    if score is None or calibration.ood_threshold is None:
        return None
    return bool(np.isfinite(score) and score <= calibration.ood_threshold)
