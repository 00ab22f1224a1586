"""Reading studies back for the pages, and saving human masks.

Everything returned is a plain, picklable value (dataclasses of numbers, strings and numpy
arrays), never an ORM object, so Streamlit can cache it and nothing depends on a closed session.

Over 400 lines because it is the pages' one reading-and-saving API (values, reading, versions,
saving, worklist rows); it is split when the pages move onto services (issue 16), so that the
pages change once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import torch

from database import annotation_versions, images, model_versions, predictions, versioning
from database import worklist as worklist_queries
from database.models import User
from inference.gradcam import gradcam
from inference.loading import XRay
from inference.model import LoadedModel
from inference.predict import infection_percentages
from inference.preprocess import preprocess
from inference.severity import SCALE_NAME, severity
from inference.storage import xray_from_npz_bytes
from services.ingest import ModelHandle, SessionFactory, ensure_prediction
from services.masks import dice
from services.next_study import First, MostUncertain, NextStudyStrategy, ReviewQueue
from settings import MASK_KINDS as MASK_KINDS  # re-exported for the pages

KIND_LABELS = {"lung": "Lung mask", "infection": "Infection mask"}
STATUS_LABELS = {
    "draft": "draft",
    "submitted": "submitted",
    "approved": "approved",
    "returned": "sent back",
}


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


@dataclass(frozen=True)
class VersionInfo:
    id: int
    kind: str
    status: str
    author: str
    author_role: str
    created: datetime
    parent_id: int | None
    conflict: bool
    comment: str | None


@dataclass(frozen=True)
class SaveOutcome:
    ok: bool
    version_id: int | None  # the new version, or the conflict draft the refused mask became
    message: str


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


def _prediction_view(row: Any, version: str) -> PredictionView:
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
    )


def stored_prediction(
    scope: SessionFactory, image_id: int, model: ModelInfo
) -> PredictionView | None:
    with scope(write=False) as session:
        row = predictions.get_prediction(session, image_id, model.id)
        return None if row is None else _prediction_view(row, model.version)


def prediction_for(
    scope: SessionFactory, image_id: int, model: ModelInfo, loaded: LoadedModel | None
) -> PredictionView | None:
    """The stored prediction; computed and stored first if this model never saw the study."""
    view = stored_prediction(scope, image_id, model)
    if view is None and loaded is not None:
        xray = load_xray_payload(scope, image_id)
        ensure_prediction(scope, image_id, xray, ModelHandle(model.id, model.version, loaded))
        view = stored_prediction(scope, image_id, model)
    return view


def gradcam_for(pixels: np.ndarray, model: LoadedModel, class_name: str) -> np.ndarray:
    """Grad-CAM of ``class_name`` on the original grid, as ``inference.predict`` computes it
    (``forward_with_features`` + ``inference.gradcam.gradcam``) for a class of the user's choice."""
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
    with torch.inference_mode():
        _, _, features = net.forward_with_features(tensor)
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


# ----------------------------------------------------------------------------- versions
def _version_info(v: Any) -> VersionInfo:
    return VersionInfo(
        id=v.id,
        kind=v.kind,
        status=v.status,
        author=v.author.name,
        author_role=v.author.role,
        created=v.created,
        parent_id=v.parent_id,
        conflict=bool(v.conflict),
        comment=v.comment,
    )


def list_versions(scope: SessionFactory, image_id: int, kind: str) -> list[VersionInfo]:
    """All versions of (image, kind), oldest first (conflict drafts included)."""
    with scope(write=False) as session:
        return [
            _version_info(v) for v in annotation_versions.list_versions(session, image_id, kind)
        ]


def head_version(scope: SessionFactory, image_id: int, kind: str) -> VersionInfo | None:
    with scope(write=False) as session:
        head = annotation_versions.head_version(session, image_id, kind)
        return None if head is None else _version_info(head)


def version_mask(scope: SessionFactory, version_id: int) -> np.ndarray:
    with scope(write=False) as session:
        v = annotation_versions.get_version(session, version_id)
        if v is None:
            raise LookupError(f"no version {version_id}")
        return annotation_versions.version_mask(v)


def version_table(
    versions: Sequence[VersionInfo], masks: dict[int, np.ndarray], model_mask: np.ndarray
) -> list[dict[str, Any]]:
    """Rows for the history table, newest first, with each version's Dice against the model."""
    rows = []
    for v in reversed(versions):
        mask = masks.get(v.id)
        rows.append(
            {
                "version": v.id,
                "status": STATUS_LABELS.get(v.status, v.status)
                + (" (conflict draft)" if v.conflict else ""),
                "author": f"{v.author} ({v.author_role})",
                "saved (UTC)": v.created.strftime("%Y-%m-%d %H:%M:%S"),
                "drawn on": "model" if v.parent_id is None else f"v{v.parent_id}",
                "Dice vs model": None if mask is None else round(dice(mask, model_mask), 4),
                "comment": v.comment or "",
            }
        )
    return rows


# ----------------------------------------------------------------------------- saving
def _user(session: Any, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise LookupError("the signed-in user no longer exists; sign in again")
    return user


def save_mask(
    scope: SessionFactory,
    image_id: int,
    kind: str,
    mask: np.ndarray,
    user_id: int,
    status: str,
    base_version_id: int | None,
    comment: str | None = None,
    prediction_id: int | None = None,
) -> SaveOutcome:
    """Append a version drawn on ``base_version_id``. A stale base is refused; the mask is then
    kept as the author's conflict draft (a transaction of its own, after the refused one rolled
    back) and the outcome carries the message naming it."""
    comment = (comment or "").strip() or None
    mask = np.asarray(mask, bool)
    try:
        with scope() as session:
            version = annotation_versions.save_annotation(
                session,
                image_id,
                kind,
                mask,
                _user(session, user_id),
                status,
                base_version_id,
                comment=comment,
                prediction_id=prediction_id,
            )
            new_id = int(version.id)
    except versioning.StaleVersionError as refused:
        with scope() as session:
            draft = annotation_versions.save_conflict_draft(
                session,
                image_id,
                kind,
                mask,
                _user(session, user_id),
                base_version_id,
                comment=comment,
                prediction_id=prediction_id,
            )
            kept = refused.kept_as(int(draft.id))
        return SaveOutcome(False, kept.conflict_version_id, str(kept))
    except (versioning.RoleError, ValueError, LookupError) as exc:
        return SaveOutcome(False, None, str(exc))
    word = {"draft": "Draft saved", "submitted": "Submitted for review"}.get(
        status, f"Saved as {STATUS_LABELS.get(status, status)}"
    )
    return SaveOutcome(True, new_id, f"{word}: {KIND_LABELS[kind].lower()} version {new_id}.")


def review_head(
    scope: SessionFactory,
    image_id: int,
    kind: str,
    user_id: int,
    action: str,
    base_version_id: int,
    comment: str | None = None,
) -> SaveOutcome:
    """A radiologist approves (``action="approve"``) or sends back (``"return"``) the head."""
    comment = (comment or "").strip() or None
    if action == "return" and not comment:
        return SaveOutcome(False, None, "Say what needs changing: a comment is required.")
    fn = {
        "approve": annotation_versions.approve_annotation,
        "return": annotation_versions.return_annotation,
    }.get(action)
    if fn is None:
        raise ValueError(f"unknown review action {action!r}")
    try:
        with scope() as session:
            version = fn(session, image_id, kind, _user(session, user_id), base_version_id, comment)
            new_id = int(version.id)
    except versioning.StaleVersionError as exc:
        return SaveOutcome(False, None, str(exc))
    except (versioning.RoleError, ValueError, LookupError) as exc:
        return SaveOutcome(False, None, str(exc))
    word = "Approved" if action == "approve" else "Sent back"
    return SaveOutcome(True, new_id, f"{word}: {KIND_LABELS[kind].lower()} version {new_id}.")


def change_status(
    scope: SessionFactory,
    image_id: int,
    kind: str,
    user_id: int,
    status: str,
    base_version_id: int,
    comment: str | None = None,
) -> SaveOutcome:
    """An unchanged head moves on: approved or sent back (a review version), or submitted (a
    draft changes its status; no duplicate version)."""
    if status in ("approved", "returned"):
        action = "approve" if status == "approved" else "return"
        return review_head(scope, image_id, kind, user_id, action, base_version_id, comment)
    if status != "submitted":
        raise ValueError(f"unknown status change {status!r}")
    with scope(write=False) as session:
        head = annotation_versions.head_version(session, image_id, kind)
        head_status = None if head is None else head.status
    if head_status in ("submitted", "approved"):
        return SaveOutcome(
            False, None, f"Nothing to submit: version {base_version_id} is already {head_status}."
        )
    if head_status != "draft":  # e.g. sent back and resubmitted as it is: a new round
        with scope(write=False) as session:
            head = annotation_versions.get_version(session, base_version_id)
            mask = None if head is None else annotation_versions.version_mask(head)
        if mask is None:
            return SaveOutcome(False, None, f"Version {base_version_id} no longer exists.")
        return save_mask(
            scope, image_id, kind, mask, user_id, "submitted", base_version_id, comment
        )
    try:
        with scope() as session:
            version = annotation_versions.submit_draft(
                session, image_id, kind, _user(session, user_id), base_version_id
            )
            done = int(version.id)
    except versioning.StaleVersionError as exc:
        return SaveOutcome(False, None, str(exc))
    except (ValueError, LookupError) as exc:
        return SaveOutcome(False, None, str(exc))
    return SaveOutcome(
        True, done, f"Submitted for review: {KIND_LABELS[kind].lower()} version {done}."
    )


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
    "Oldest first": "oldest",
}
WORKLIST_STATUSES: tuple[str, ...] = worklist_queries.WORKLIST_STATUSES


def worklist(
    scope: SessionFactory,
    statuses: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    sort: str = "created",
) -> list[worklist_queries.WorklistRow]:
    """Studies with their prediction (active model) and review status; empty filters = all."""
    with scope(write=False) as session:
        rows = worklist_queries.worklist(
            session, status=list(statuses) if statuses else None, sort=sort
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
