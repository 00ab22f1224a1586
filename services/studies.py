"""Reading studies back for the pages: the active model, a study, its stored X-ray and
prediction, its thumbnail, the worklist and the next study to look at.

Everything returned is a plain, picklable value (dataclasses of numbers, strings and numpy
arrays), never an ORM object, so Streamlit can cache it and nothing depends on a closed session.
It is also the pages' one import for studies: it re-exports ``services.prediction_view`` (a
prediction as shown: domain verdict, calibration note, Grad-CAM, infection numbers) and
``services.mask_versions`` (mask history, saving, review).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from database import images, model_versions, predictions
from database import worklist as worklist_queries
from inference.loading import XRay
from inference.model import LoadedModel
from inference.severity import SCALE_NAME
from inference.storage import xray_from_npz_bytes
from services.ingest import (
    ModelHandle,
    SessionFactory,
    ensure_domain_score,
    ensure_prediction,
)
from services.mask_versions import (
    KIND_LABELS,
    STATUS_LABELS,
    SaveOutcome,
    VersionInfo,
    change_status,
    head_version,
    list_versions,
    review_head,
    save_mask,
    save_version,
    signed_in_user,
    version_mask,
    version_table,
)
from services.next_study import First, MostUncertain, NextStudyStrategy, ReviewQueue
from services.prediction_view import (
    DOMAIN_LABELS,
    DomainVerdict,
    InfectionSummary,
    PredictionView,
    calibration_note,
    domain_verdict,
    gradcam_for,
    infection_summary,
    prediction_view,
)
from settings import MASK_KINDS

__all__ = [  # the pages import these from here
    "DOMAIN_FILTERS", "DOMAIN_LABELS", "KIND_LABELS", "MASK_KINDS", "NEXT_STUDY", "SCALE_NAME",
    "SORTS", "STATUS_LABELS", "WORKLIST_STATUSES", "DomainVerdict", "InfectionSummary",
    "ModelInfo", "PredictionView", "SaveOutcome", "StudyInfo", "VersionInfo", "active_model",
    "calibration_note", "change_status", "domain_verdict", "gradcam_for", "head_version",
    "infection_summary", "list_versions", "load_xray_payload", "next_to_review",
    "prediction_for", "review_head", "save_mask", "save_version", "signed_in_user",
    "stored_prediction", "study_info", "thumbnail", "version_mask", "version_table",
    "worklist",
]


# ----------------------------------------------------------------------------- values
@dataclass(frozen=True)
class ModelInfo:
    id: int
    version: str
    checkpoint_path: str
    checkpoint_sha256: str | None


@dataclass(frozen=True)
class StudyInfo:
    image_id: int
    sha256: str
    display_name: str
    source: str
    metadata: dict[str, Any]
    width: int
    height: int
    created: datetime


# ----------------------------------------------------------------------------- reading
def active_model(scope: SessionFactory) -> ModelInfo | None:
    with scope(write=False) as session:
        row = model_versions.get_active_model_version(session)
        if row is None:
            return None
        return ModelInfo(row.id, row.version, row.checkpoint_path, row.checkpoint_sha256)


def study_info(scope: SessionFactory, image_id: int) -> StudyInfo | None:
    with scope(write=False) as session:
        img = images.get_image(session, image_id)
        if img is None:
            return None
        return StudyInfo(
            image_id=img.id,
            sha256=img.sha256,
            display_name=img.display_name,
            source=img.source,
            metadata=dict(img.meta or {}),
            width=img.width,
            height=img.height,
            created=img.created,
        )


def load_xray_payload(scope: SessionFactory, image_id: int) -> XRay:
    """The stored de-identified X-ray (pixels, raw for window/level, metadata)."""
    with scope(write=False) as session:
        img = images.get_image(session, image_id)
        if img is None:
            raise LookupError(f"no study {image_id}")
        data = images.read_image_payload(img)
    return xray_from_npz_bytes(data)


def stored_prediction(
    scope: SessionFactory, image_id: int, model: ModelInfo
) -> PredictionView | None:
    with scope(write=False) as session:
        row = predictions.get_prediction(session, image_id, model.id)
        return None if row is None else prediction_view(row, model.version)


def prediction_for(
    scope: SessionFactory, image_id: int, model: ModelInfo, loaded: LoadedModel | None
) -> PredictionView | None:
    """The stored prediction; computed and stored first if this model never saw the study, and
    given its out-of-domain score if it was stored without one."""
    view = stored_prediction(scope, image_id, model)
    if loaded is None:
        return view
    if view is None or (view.ood_score is None and loaded.calibration.has_ood):
        xray = load_xray_payload(scope, image_id)
        handle = ModelHandle(model.id, model.version, loaded)
        ensure_prediction(scope, image_id, xray, handle)
        ensure_domain_score(scope, image_id, xray, handle)
        view = stored_prediction(scope, image_id, model)
    return view


def thumbnail(scope: SessionFactory, image_id: int) -> str:
    """A small PNG data URI of the study for the worklist."""
    from services.display import thumbnail_uri

    return thumbnail_uri(load_xray_payload(scope, image_id).pixels)


# ----------------------------------------------------------------------------- worklist
SORTS: dict[str, str] = {
    "Newest first": "created",
    "Infection % (highest first)": "infection",
    "Uncertainty (highest first)": "uncertainty",
    "Severity (highest first)": "severity",
    "Out-of-domain score (highest first)": "out_of_domain",
    "Oldest first": "oldest",
}
WORKLIST_STATUSES: tuple[str, ...] = worklist_queries.WORKLIST_STATUSES
# The worklist's in-domain filter: label -> database.worklist.DOMAIN_FILTERS value.
DOMAIN_FILTERS: dict[str, str] = {
    "In domain": "in",
    "Out of domain": "out",
    "Not scored": "unscored",
}


def worklist(
    scope: SessionFactory,
    statuses: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    sort: str = "created",
    domains: Sequence[str] | None = None,
) -> list[worklist_queries.WorklistRow]:
    """Studies with their prediction (active model) and review status; empty filters = all.
    ``domains``: values of ``DOMAIN_FILTERS`` ("in", "out", "unscored")."""
    with scope(write=False) as session:
        rows = worklist_queries.worklist(
            session,
            status=list(statuses) if statuses else None,
            sort=sort,
            domain=list(domains) if domains else None,
        )
    if classes:
        wanted = set(classes)
        rows = [r for r in rows if r.predicted_class in wanted]
    return rows


# Per role, the strategy "Next study" follows (services.next_study): radiologists get the
# submitted work waiting for their approval first; annotators new studies, most uncertain first.
NEXT_STUDY: dict[str | None, NextStudyStrategy] = {
    "radiologist": First((ReviewQueue("submitted"), MostUncertain("new"), ReviewQueue("returned"))),
    None: First((MostUncertain("new"), ReviewQueue("returned"), ReviewQueue("submitted"))),
}


def next_to_review(
    scope: SessionFactory,
    exclude: Sequence[int] = (),
    role: str | None = None,
    strategy: NextStudyStrategy | None = None,
) -> int | None:
    """The next study to look at by ``strategy`` (default: ``role``'s, see NEXT_STUDY),
    skipping ``exclude``."""
    chosen = strategy if strategy is not None else NEXT_STUDY.get(role, NEXT_STUDY[None])
    with scope(write=False) as session:
        rows = worklist_queries.worklist(session)
    row = chosen.choose(rows, exclude)
    return None if row is None else row.image_id
