"""Helpers shared by the database tests: a stand-in prediction, boxes, rows, the caller's side
of a refused save. The ``db_path`` and ``engine`` fixtures live in conftest.py."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import Engine, func, select

from database import annotation_versions, images, model_versions
from database.models import Image, ModelVersion, User
from database.session import (
    session_scope,
)
from database.versioning import StaleVersionError

H, W = 48, 64
DATABASE_BACKENDS = ("sqlite", "postgresql")  # conftest's engine / database_url run on each


# --------------------------------------------------------------------------- helpers


@dataclass
class FakePrediction:
    """Stand-in with the attributes of inference.predict.Prediction that the database stores."""

    predicted_class: str = "COVID-19"
    probabilities: dict[str, float] = field(
        default_factory=lambda: {"COVID-19": 0.7, "Non-COVID": 0.2, "Normal": 0.1}
    )
    class_names: list[str] = field(default_factory=lambda: ["COVID-19", "Non-COVID", "Normal"])
    lung_mask: np.ndarray = field(default_factory=lambda: box(5, 5, 40, 60))
    infection_mask: np.ndarray = field(default_factory=lambda: box(10, 10, 20, 30))
    infection_percent: float = 12.5
    infection_percent_left: float = 10.0
    infection_percent_right: float = 15.0
    severity: str = "mild"
    severity_score: int = 2
    model_version: str = "v1"
    uncertainty: float = 0.3
    timings_ms: dict[str, float] = field(default_factory=lambda: {"model": 12.0})


def box(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def add_image(s, seed: int = 0, name: str = "patient.png") -> Image:
    payload = f"payload-{seed}".encode() * 10
    sha = hashlib.sha256(f"original-{seed}".encode()).hexdigest()
    image, _ = images.add_image(s, payload, sha, name, {"format": "PNG"}, W, H, "upload")
    return image


def model_version(s, version: str = "v1", activate: bool = True) -> ModelVersion:
    return model_versions.register_model_version(
        s,
        version,
        f"/models/{version}.pt",
        hashlib.sha256(version.encode()).hexdigest(),
        {"dice": 0.8},
        activate=activate,
    )


def save_or_keep_draft(
    engine: Engine,
    image_id: int,
    kind: str,
    mask: np.ndarray,
    author: User,
    status: str,
    base_id: int | None,
) -> StaleVersionError:
    """The caller's side of a refused save (as ``services.studies.save_mask`` does it): the
    refusal rolls back, and the mask is kept as a conflict draft in a transaction of its own."""
    try:
        with session_scope(engine) as s:
            annotation_versions.save_annotation(s, image_id, kind, mask, author, status, base_id)
    except StaleVersionError as exc:
        with session_scope(engine) as s:
            draft = annotation_versions.save_conflict_draft(
                s, image_id, kind, mask, author, base_id
            )
            return exc.kept_as(draft.id)
    raise AssertionError("the save was not refused")


def count(engine: Engine, model: type) -> int:
    with session_scope(engine, write=False) as s:
        return s.scalar(select(func.count()).select_from(model))
