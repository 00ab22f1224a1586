"""Reading studies back for the pages, and saving human masks.

Everything returned is a plain, picklable value (dataclasses of numbers, strings and numpy
arrays), never an ORM object, so Streamlit can cache it and nothing depends on a closed session.

Over 400 lines because it is the pages' one reading-and-saving API (values, reading, versions,
saving, worklist rows); it is split when the pages move onto services (issue 16), so that the
pages change once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import torch

from database import annotation_versions, audit, images, model_versions, predictions, versioning
from database import worklist as worklist_queries
from database.models import User
from inference.gradcam import gradcam
from inference.loading import XRay
from inference.model import LoadedModel
from inference.predict import infection_percentages
from inference.preprocess import preprocess
from inference.severity import SCALE_NAME, severity
from inference.storage import xray_from_npz_bytes
from services.ingest import (
    ModelHandle,
    SessionFactory,
    ensure_domain_score,
    ensure_prediction,
)
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
    ood_score: float | None = None  # None: not scored (see database.predictions)
    in_domain: bool | None = None


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
        ood_score=None if row.ood_score is None else float(row.ood_score),
        in_domain=None if row.in_domain is None else bool(row.in_domain),
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
def signed_in_user(session: Any, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise LookupError("the signed-in user no longer exists; sign in again")
    return user


AUDIT_ACTION = {"draft": "save", "submitted": "submit", "approved": "approve",
                "returned": "send back"}


def _audit(session: Any, status: str, user: User, image_id: int, detail: str) -> None:
    """The save in the audit trail, in the save's own transaction."""
    audit.record(session, AUDIT_ACTION[status], user, image_id=image_id, detail=detail)


def save_version(
    scope: SessionFactory,
    user_id: int,
    save: Callable[[Any, User], Any],
    keep_draft: Callable[[Any, User], Any],
    done: Callable[[int], str],
    audit_as: tuple[str, int, str] | None = None,
) -> SaveOutcome:
    """``save(session, user)`` in a transaction. A stale base is refused: the content is then
    kept by ``keep_draft(session, user)`` as the author's conflict draft (a transaction of its
    own, after the refused one rolled back) and the outcome's message names it. Other refusals
    (role, bad value, gone) are the message; ``done(version_id)`` words a success.
    ``audit_as``: (status, image id, what) recorded in the audit trail in the same transaction."""
    try:
        with scope() as session:
            user = signed_in_user(session, user_id)
            new_id = int(save(session, user).id)
            if audit_as is not None:
                status, image_id, what = audit_as
                _audit(session, status, user, image_id, f"{what} version {new_id}")
    except versioning.StaleVersionError as refused:
        with scope() as session:
            kept = refused.kept_as(int(keep_draft(session, signed_in_user(session, user_id)).id))
        return SaveOutcome(False, kept.conflict_version_id, str(kept))
    except (versioning.RoleError, ValueError, LookupError) as exc:
        return SaveOutcome(False, None, str(exc))
    return SaveOutcome(True, new_id, done(new_id))


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
    word = {"draft": "Draft saved", "submitted": "Submitted for review"}.get(
        status, f"Saved as {STATUS_LABELS.get(status, status)}"
    )
    return save_version(
        scope,
        user_id,
        lambda session, user: annotation_versions.save_annotation(
            session, image_id, kind, mask, user, status, base_version_id, comment=comment,
            prediction_id=prediction_id,
        ),
        lambda session, user: annotation_versions.save_conflict_draft(
            session, image_id, kind, mask, user, base_version_id, comment=comment,
            prediction_id=prediction_id,
        ),
        lambda new_id: f"{word}: {KIND_LABELS[kind].lower()} version {new_id}.",
        (status, image_id, f"{kind} mask"),
    )


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
            reviewer = signed_in_user(session, user_id)
            version = fn(session, image_id, kind, reviewer, base_version_id, comment)
            new_id = int(version.id)
            status = "approved" if action == "approve" else "returned"
            _audit(session, status, reviewer, image_id, f"{kind} mask version {new_id}")
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
            author = signed_in_user(session, user_id)
            version = annotation_versions.submit_draft(
                session, image_id, kind, author, base_version_id
            )
            done = int(version.id)
            _audit(session, "submitted", author, image_id, f"{kind} mask version {done}")
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
