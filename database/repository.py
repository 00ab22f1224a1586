"""The operations the app needs. Every function takes a Session; the caller owns the transaction
(``session_scope``), except ``save_annotation``'s refusal path, which commits the refused mask as
a conflict draft before raising so that nothing drawn is ever lost.

Concurrency rule for annotations: the *head* of (image, kind) is its newest non-conflict version.
A save names the head it was drawn on (``base_version_id``; None when there is no head yet). If
another save got in first, the save is refused with ``StaleVersionError`` and the mask is kept as
a ``draft`` with ``conflict=True`` whose parent is the version it was drawn on. On SQLite, write
sessions begin with ``BEGIN IMMEDIATE`` (see ``database.session``), so the head check and the
insert happen under one write lock; on other databases the image row is locked ``FOR UPDATE``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from sqlalchemy import and_, event, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, object_session

from database.masks import mask_to_png, png_to_mask
from database.models import (
    ANNOTATION_STATUSES,
    IMAGE_SOURCES,
    MASK_KINDS,
    REVIEW_STATUSES,
    ROLES,
    AnnotationVersion,
    FinetuneRun,
    Image,
    ModelVersion,
    Prediction,
    User,
    utcnow,
)
from database.session import data_dir_for, default_database_url

log = logging.getLogger(__name__)

WORKLIST_STATUSES: tuple[str, ...] = ("new", "corrected", "submitted", "approved", "returned")
WORKLIST_SORTS: tuple[str, ...] = (
    "created",
    "oldest",
    "uncertainty",
    "infection",
    "confidence",
    "severity",
    "last_touched",
    "name",
)
FINISHED_RUN_STATUSES: tuple[str, ...] = ("succeeded", "failed", "interrupted")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------- errors


class StaleVersionError(Exception):
    """A save was based on a version that is no longer the head of (image, kind).

    ``conflict_version_id`` is the draft the refused mask was kept as (None for review actions,
    which draw nothing of their own).
    """

    def __init__(
        self,
        *,
        image_id: int,
        kind: str,
        base_version_id: int | None,
        head_id: int,
        head_author: str,
        head_status: str,
        head_created: datetime,
        conflict_version_id: int | None,
    ) -> None:
        self.image_id = image_id
        self.kind = kind
        self.base_version_id = base_version_id
        self.head_id = head_id
        self.head_author = head_author
        self.head_status = head_status
        self.head_created = head_created
        self.conflict_version_id = conflict_version_id
        when = head_created.strftime("%Y-%m-%d %H:%M:%S UTC")
        message = (
            f"{head_author} saved a newer {kind} mask ({head_status}, version {head_id}) at "
            f"{when}, after the version you started from."
        )
        if conflict_version_id is not None:
            message += (
                f" Your mask was kept as draft version {conflict_version_id}; "
                "open the latest version to merge your changes."
            )
        super().__init__(message)


class RoleError(PermissionError):
    """The user's role does not allow this action."""


class PayloadError(RuntimeError):
    """A stored image payload is missing or does not match its recorded hash."""


# --------------------------------------------------------------------------- users


def get_or_create_user(session: Session, name: str, role: str) -> User:
    """The user called ``name``, created with ``role`` if new.

    An existing user keeps their role: asking for a different one raises ``ValueError``.
    """
    name = name.strip()
    if not name:
        raise ValueError("a user name must not be empty")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    user = get_user(session, name)
    if user is None:
        try:
            with session.begin_nested():
                user = User(name=name, role=role)
                session.add(user)
        except IntegrityError:  # created concurrently by another session
            user = get_user(session, name)
            assert user is not None
    if user.role != role:
        raise ValueError(f"user {name!r} exists with role {user.role!r}, not {role!r}")
    return user


def get_user(session: Session, name: str) -> User | None:
    return session.scalar(select(User).where(User.name == name.strip()))


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.name)))


# --------------------------------------------------------------------------- images


def _bind_data_dir(session: Session) -> Path:
    return data_dir_for(session.get_bind())  # type: ignore[arg-type]


@event.listens_for(Image, "load")
def _remember_data_dir(target: Image, context: Any) -> None:
    # So read_image_payload works on an image whose session has closed (Streamlit caches).
    target._infmap_data_dir = _bind_data_dir(context.session)  # type: ignore[attr-defined]


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_image(
    session: Session,
    xray_payload_bytes: bytes,
    sha256: str,
    display_name: str,
    metadata: dict[str, Any] | None,
    width: int,
    height: int,
    source: str = "upload",
) -> tuple[Image, bool]:
    """Store a study, deduplicated by the original file's sha256. Returns (image, created).

    The payload (``inference.loading.xray_to_npz_bytes``) is written atomically to
    ``<data_dir>/images/<sha256>.npz`` before the row is flushed; a crash after the write leaves
    only a content-addressed file that the next add of the same image reuses.
    """
    sha256 = sha256.lower()
    if not _SHA256.match(sha256):
        raise ValueError("sha256 must be 64 hex digits")
    if source not in IMAGE_SOURCES:
        raise ValueError(f"source must be one of {', '.join(IMAGE_SOURCES)}, not {source!r}")
    if width <= 0 or height <= 0:
        raise ValueError("width and height must be positive")
    data_dir = _bind_data_dir(session)
    relative = f"images/{sha256}.npz"
    existing = get_image_by_sha256(session, sha256)
    if existing is not None:
        if not (data_dir / existing.payload_path).is_file():  # repair a lost file store entry
            _write_atomic(data_dir / existing.payload_path, xray_payload_bytes)
        return existing, False
    target = data_dir / relative
    if not target.is_file():
        _write_atomic(target, xray_payload_bytes)
    image = Image(
        sha256=sha256,
        payload_path=relative,
        payload_sha256=hashlib.sha256(xray_payload_bytes).hexdigest(),
        display_name=display_name,
        source=source,
        meta=dict(metadata or {}),
        width=int(width),
        height=int(height),
    )
    try:
        with session.begin_nested():
            session.add(image)
    except IntegrityError:  # the same file added concurrently by another session
        existing = get_image_by_sha256(session, sha256)
        if existing is None:
            raise
        return existing, False
    image._infmap_data_dir = data_dir  # type: ignore[attr-defined]
    log.info("stored image id=%s sha256=%s", image.id, sha256[:12])
    return image, True


def get_image(session: Session, image_id: int) -> Image | None:
    return session.get(Image, image_id)


def get_image_by_sha256(session: Session, sha256: str) -> Image | None:
    return session.scalar(select(Image).where(Image.sha256 == sha256.lower()))


def image_payload_path(image: Image, data_dir: str | Path | None = None) -> Path:
    if data_dir is None:
        session = object_session(image)
        if session is not None:
            data_dir = _bind_data_dir(session)
        else:
            data_dir = getattr(image, "_infmap_data_dir", None) or data_dir_for(
                default_database_url()
            )
    return Path(data_dir) / image.payload_path


def read_image_payload(image: Image, data_dir: str | Path | None = None) -> bytes:
    """The stored de-identified payload (feed to ``inference.loading.xray_from_npz_bytes``)."""
    path = image_payload_path(image, data_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise PayloadError(f"the stored file for image {image.id} is missing") from exc
    if hashlib.sha256(data).hexdigest() != image.payload_sha256:
        raise PayloadError(f"the stored file for image {image.id} is corrupt (hash mismatch)")
    return data


# --------------------------------------------------------------------------- model versions


def register_model_version(
    session: Session,
    version: str,
    checkpoint_path: str | Path,
    sha256: str | None,
    metrics: dict[str, Any] | None = None,
    parent: ModelVersion | int | None = None,
    lineage: dict[str, Any] | None = None,
    train_minutes: float | None = None,
    activate: bool = False,
) -> ModelVersion:
    """Record a checkpoint. Re-registering the same version with the same hash returns it.

    The first version registered while none is active becomes active, so that once any version
    exists exactly one is active.
    """
    existing = get_model_version(session, version)
    if existing is not None:
        if sha256 and existing.checkpoint_sha256 and existing.checkpoint_sha256 != sha256:
            raise ValueError(f"model version {version!r} is already registered with another file")
        row = existing
    else:
        parent_id = parent.id if isinstance(parent, ModelVersion) else parent
        row = ModelVersion(
            version=version,
            checkpoint_path=str(checkpoint_path),
            checkpoint_sha256=sha256,
            parent_id=parent_id,
            lineage=dict(lineage or {}),
            metrics=dict(metrics or {}),
            train_minutes=train_minutes,
            active=False,
        )
        session.add(row)
        session.flush()
    if activate or get_active_model_version(session) is None:
        set_active_model_version(session, row.id)
    return row


def get_model_version(session: Session, version: str) -> ModelVersion | None:
    return session.scalar(select(ModelVersion).where(ModelVersion.version == version))


def get_model_version_by_sha256(session: Session, sha256: str) -> ModelVersion | None:
    """The version registered for a checkpoint file with these bytes, if any."""
    return session.scalar(
        select(ModelVersion).where(ModelVersion.checkpoint_sha256 == sha256).limit(1)
    )


def get_active_model_version(session: Session) -> ModelVersion | None:
    return session.scalar(select(ModelVersion).where(ModelVersion.active.is_(True)))


def set_active_model_version(session: Session, model_version_id: int) -> ModelVersion:
    """Make one version the active one (rolling back = activating an older version)."""
    row = session.get(ModelVersion, model_version_id)
    if row is None:
        raise LookupError(f"no model version {model_version_id}")
    # Two statements: clearing first keeps the one-active unique index satisfied throughout.
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.active.is_(True), ModelVersion.id != model_version_id)
        .values(active=False)
        .execution_options(synchronize_session="fetch")
    )
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.id == model_version_id)
        .values(active=True)
        .execution_options(synchronize_session="fetch")
    )
    session.flush()
    return row


def list_model_versions(session: Session) -> list[ModelVersion]:
    """Newest first."""
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.id.desc())))


# --------------------------------------------------------------------------- predictions


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


def store_prediction(
    session: Session, image_id: int, model_version_id: int, prediction: PredictionLike
) -> Prediction:
    """Store the model's output once per (image, model version); a repeat returns the first.

    Stored: probabilities, class, both masks (PNG), infection %, severity, uncertainty, timings.
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


def get_prediction(session: Session, image_id: int, model_version_id: int) -> Prediction | None:
    return session.scalar(
        select(Prediction).where(
            Prediction.image_id == image_id, Prediction.model_version_id == model_version_id
        )
    )


def prediction_masks(pred_row: Prediction) -> tuple[np.ndarray, np.ndarray]:
    """(lung mask, infection mask) as bool arrays on the image grid."""
    return png_to_mask(pred_row.lung_mask_png), png_to_mask(pred_row.infection_mask_png)


# --------------------------------------------------------------------------- annotation versions


@event.listens_for(AnnotationVersion, "before_update")
def _refuse_update(mapper: Any, connection: Any, target: AnnotationVersion) -> None:
    raise RuntimeError("annotation versions are append-only: save a new version instead")


@event.listens_for(AnnotationVersion, "before_delete")
def _refuse_delete(mapper: Any, connection: Any, target: AnnotationVersion) -> None:
    raise RuntimeError("annotation versions are append-only and are never deleted")


def _check_kind(kind: str) -> None:
    if kind not in MASK_KINDS:
        raise ValueError(f"kind must be one of {', '.join(MASK_KINDS)}, not {kind!r}")


def head_version(session: Session, image_id: int, kind: str) -> AnnotationVersion | None:
    """The newest non-conflict version of (image, kind), or None."""
    _check_kind(kind)
    return session.scalar(
        select(AnnotationVersion)
        .where(
            AnnotationVersion.image_id == image_id,
            AnnotationVersion.kind == kind,
            AnnotationVersion.conflict.is_(False),
        )
        .order_by(AnnotationVersion.id.desc())
        .limit(1)
    )


def _lock_image(session: Session, image_id: int) -> Image:
    # FOR UPDATE serialises savers on PostgreSQL; SQLite already holds its write lock.
    image = session.get(Image, image_id, with_for_update=True)
    if image is None:
        raise LookupError(f"no image {image_id}")
    return image


def _stale(
    image_id: int,
    kind: str,
    base_version_id: int | None,
    head: AnnotationVersion,
    conflict_version_id: int | None,
) -> StaleVersionError:
    return StaleVersionError(
        image_id=image_id,
        kind=kind,
        base_version_id=base_version_id,
        head_id=head.id,
        head_author=head.author.name,
        head_status=head.status,
        head_created=head.created,
        conflict_version_id=conflict_version_id,
    )


def save_annotation(
    session: Session,
    image_id: int,
    kind: str,
    mask: np.ndarray,
    author: User,
    status: str,
    base_version_id: int | None,
    comment: str | None = None,
    prediction_id: int | None = None,
) -> AnnotationVersion:
    """Append a version of (image, kind) drawn on ``base_version_id``, which must be the head.

    Raises ``StaleVersionError`` when it is not, after committing the mask as the author's
    conflict draft (so this call commits the session on that path). ``approved``/``returned``
    require a radiologist.
    """
    _check_kind(kind)
    if status not in ANNOTATION_STATUSES:
        raise ValueError(f"status must be one of {', '.join(ANNOTATION_STATUSES)}, not {status!r}")
    if status in REVIEW_STATUSES and author.role != "radiologist":
        raise RoleError(f"only a radiologist may mark a mask {status}")
    image = _lock_image(session, image_id)
    if np.shape(mask) != (image.height, image.width):
        raise ValueError(
            f"the mask has shape {np.shape(mask)}, the image is {image.height}x{image.width}"
        )
    if base_version_id is not None:
        base = session.get(AnnotationVersion, base_version_id)
        if base is None or base.image_id != image_id or base.kind != kind:
            raise ValueError(f"version {base_version_id} is not a {kind} mask of this image")
    if prediction_id is not None:
        pred = session.get(Prediction, prediction_id)
        if pred is None or pred.image_id != image_id:
            raise ValueError(f"prediction {prediction_id} is not of this image")
    png = mask_to_png(mask)
    head = head_version(session, image_id, kind)
    if (head.id if head is not None else None) != base_version_id:
        assert head is not None  # a valid base implies a head exists
        draft = AnnotationVersion(
            image_id=image_id,
            kind=kind,
            mask_png=png,
            author_id=author.id,
            status="draft",
            parent_id=base_version_id,
            prediction_id=prediction_id,
            conflict=True,
            comment=comment,
        )
        session.add(draft)
        session.flush()
        error = _stale(image_id, kind, base_version_id, head, draft.id)
        session.commit()  # keep the refused mask even though the caller will roll back
        log.info("refused stale save on image %s %s; kept as draft %s", image_id, kind, draft.id)
        raise error
    version = AnnotationVersion(
        image_id=image_id,
        kind=kind,
        mask_png=png,
        author_id=author.id,
        status=status,
        parent_id=base_version_id,
        prediction_id=prediction_id,
        conflict=False,
        comment=comment,
    )
    session.add(version)
    session.flush()
    return version


def _review(
    session: Session,
    image_id: int,
    kind: str,
    reviewer: User,
    status: str,
    base_version_id: int,
    comment: str | None,
) -> AnnotationVersion:
    _check_kind(kind)
    if reviewer.role != "radiologist":
        raise RoleError(f"only a radiologist may mark a mask {status}")
    _lock_image(session, image_id)
    head = head_version(session, image_id, kind)
    if head is None:
        raise ValueError(f"there is no {kind} mask to review for this image")
    if head.id != base_version_id:
        raise _stale(image_id, kind, base_version_id, head, None)
    version = AnnotationVersion(
        image_id=image_id,
        kind=kind,
        mask_png=head.mask_png,
        author_id=reviewer.id,
        status=status,
        parent_id=head.id,
        prediction_id=head.prediction_id,
        conflict=False,
        comment=comment,
    )
    session.add(version)
    session.flush()
    return version


def approve_annotation(
    session: Session,
    image_id: int,
    kind: str,
    reviewer: User,
    base_version_id: int,
    comment: str | None = None,
) -> AnnotationVersion:
    """A radiologist approves the head: a new ``approved`` version with the head's mask."""
    return _review(session, image_id, kind, reviewer, "approved", base_version_id, comment)


def return_annotation(
    session: Session,
    image_id: int,
    kind: str,
    reviewer: User,
    base_version_id: int,
    comment: str | None = None,
) -> AnnotationVersion:
    """A radiologist sends the head back: a new ``returned`` version with the head's mask."""
    return _review(session, image_id, kind, reviewer, "returned", base_version_id, comment)


def list_versions(
    session: Session, image_id: int, kind: str | None = None
) -> list[AnnotationVersion]:
    """All versions (conflict drafts included), oldest first."""
    stmt = select(AnnotationVersion).where(AnnotationVersion.image_id == image_id)
    if kind is not None:
        _check_kind(kind)
        stmt = stmt.where(AnnotationVersion.kind == kind)
    return list(session.scalars(stmt.order_by(AnnotationVersion.id)))


def get_version(session: Session, version_id: int) -> AnnotationVersion | None:
    return session.get(AnnotationVersion, version_id)


def version_mask(version: AnnotationVersion) -> np.ndarray:
    return png_to_mask(version.mask_png)


def drafts_for(
    session: Session,
    user: User,
    image_id: int | None = None,
    kind: str | None = None,
    conflict_only: bool = False,
) -> list[AnnotationVersion]:
    """The user's drafts (conflict drafts included), newest first."""
    stmt = select(AnnotationVersion).where(
        AnnotationVersion.author_id == user.id, AnnotationVersion.status == "draft"
    )
    if image_id is not None:
        stmt = stmt.where(AnnotationVersion.image_id == image_id)
    if kind is not None:
        _check_kind(kind)
        stmt = stmt.where(AnnotationVersion.kind == kind)
    if conflict_only:
        stmt = stmt.where(AnnotationVersion.conflict.is_(True))
    return list(session.scalars(stmt.order_by(AnnotationVersion.id.desc())))


def training_annotations(
    session: Session,
    statuses: Sequence[str] = ("submitted", "approved"),
    kinds: Sequence[str] = MASK_KINDS,
) -> list[AnnotationVersion]:
    """For fine-tuning: per (image, kind), the newest non-conflict version among ``statuses``.

    A later ``returned`` version vetoes what it sent back (a newer submission counts again);
    later drafts do not. Ordered by image, kind.
    """
    wanted = set(statuses)
    bad = wanted - set(ANNOTATION_STATUSES)
    if bad:
        raise ValueError(f"unknown statuses {sorted(bad)}")
    considered = wanted | {"returned"}
    latest = (
        select(
            AnnotationVersion.image_id,
            AnnotationVersion.kind,
            func.max(AnnotationVersion.id).label("vid"),
        )
        .where(
            AnnotationVersion.conflict.is_(False),
            AnnotationVersion.status.in_(considered),
            AnnotationVersion.kind.in_(list(kinds)),
        )
        .group_by(AnnotationVersion.image_id, AnnotationVersion.kind)
        .subquery()
    )
    stmt = (
        select(AnnotationVersion)
        .join(latest, AnnotationVersion.id == latest.c.vid)
        .where(AnnotationVersion.status.in_(wanted))
        .order_by(AnnotationVersion.image_id, AnnotationVersion.kind)
    )
    return list(session.scalars(stmt))


# --------------------------------------------------------------------------- worklist


@dataclass(frozen=True)
class WorklistRow:
    image_id: int
    sha256: str  # content hash: the key the app caches thumbnails by
    display_name: str
    source: str
    created: datetime
    prediction_id: int | None
    predicted_class: str | None
    confidence: float | None
    infection_percent: float | None
    severity: str | None
    severity_score: int | None
    uncertainty: float | None
    status: str  # new | corrected | submitted | approved | returned
    last_author: str | None
    last_touched: datetime | None


def derive_status(newest_status: str | None) -> str:
    """Worklist status from the newest non-conflict version over both kinds."""
    if newest_status is None:
        return "new"
    return "corrected" if newest_status == "draft" else newest_status


def _none_last(value: Any, reverse: bool) -> tuple[int, Any]:
    # For sorted(): rows with no value go last whichever way the values run.
    if value is None:
        return (1, 0)
    return (0, -value if reverse else value)


_SORT_KEYS: dict[str, Any] = {
    "created": lambda r: (-r.created.timestamp(), -r.image_id),
    "oldest": lambda r: (r.created.timestamp(), r.image_id),
    "uncertainty": lambda r: (_none_last(r.uncertainty, True), r.image_id),
    "infection": lambda r: (_none_last(r.infection_percent, True), r.image_id),
    "confidence": lambda r: (_none_last(r.confidence, False), r.image_id),
    "severity": lambda r: (
        _none_last(r.severity_score, True),
        _none_last(r.infection_percent, True),
        r.image_id,
    ),
    "last_touched": lambda r: (
        _none_last(r.last_touched.timestamp() if r.last_touched else None, True),
        r.image_id,
    ),
    "name": lambda r: (r.display_name.casefold(), r.image_id),
}


def worklist(
    session: Session,
    status: str | Iterable[str] | None = None,
    predicted_class: str | None = None,
    sort: str = "created",
    model_version_id: int | None = None,
) -> list[WorklistRow]:
    """Every image with its prediction (by ``model_version_id``, default the active version) and
    review status.

    Sorts: created (newest first), oldest, uncertainty / infection / severity (highest first),
    confidence (lowest first), last_touched (newest first), name. Missing values sort last.
    """
    if sort not in _SORT_KEYS:
        raise ValueError(f"sort must be one of {', '.join(WORKLIST_SORTS)}, not {sort!r}")
    wanted: set[str] | None = None
    if status is not None:
        wanted = {status} if isinstance(status, str) else set(status)
        if wanted - set(WORKLIST_STATUSES):
            raise ValueError(f"unknown worklist status in {sorted(wanted)}")
    if model_version_id is None:
        active = get_active_model_version(session)
        model_version_id = active.id if active is not None else -1
    newest = (
        select(AnnotationVersion.image_id, func.max(AnnotationVersion.id).label("vid"))
        .where(AnnotationVersion.conflict.is_(False))
        .group_by(AnnotationVersion.image_id)
        .subquery()
    )
    stmt = (
        select(
            Image.id,
            Image.sha256,
            Image.display_name,
            Image.source,
            Image.created,
            Prediction.id,
            Prediction.predicted_class,
            Prediction.confidence,
            Prediction.infection_percent,
            Prediction.severity,
            Prediction.severity_score,
            Prediction.uncertainty,
            AnnotationVersion.status,
            User.name,
            AnnotationVersion.created,
        )
        .outerjoin(
            Prediction,
            and_(Prediction.image_id == Image.id, Prediction.model_version_id == model_version_id),
        )
        .outerjoin(newest, newest.c.image_id == Image.id)
        .outerjoin(AnnotationVersion, AnnotationVersion.id == newest.c.vid)
        .outerjoin(User, User.id == AnnotationVersion.author_id)
    )
    if predicted_class is not None:
        stmt = stmt.where(Prediction.predicted_class == predicted_class)
    rows = []
    for r in session.execute(stmt):
        row = WorklistRow(
            image_id=r[0],
            sha256=r[1],
            display_name=r[2],
            source=r[3],
            created=r[4],
            prediction_id=r[5],
            predicted_class=r[6],
            confidence=r[7],
            infection_percent=r[8],
            severity=r[9],
            severity_score=r[10],
            uncertainty=r[11],
            status=derive_status(r[12]),
            last_author=r[13],
            last_touched=r[14],
        )
        if wanted is None or row.status in wanted:
            rows.append(row)
    rows.sort(key=_SORT_KEYS[sort])
    return rows


def next_to_review(
    session: Session,
    by: str = "oldest",
    status: str | Iterable[str] = "new",
    model_version_id: int | None = None,
    exclude: Iterable[int] = (),
) -> WorklistRow | None:
    """The next image to look at: the oldest with ``status`` (default ``new``), or with
    ``by="uncertainty"`` the one the model is least sure of. ``exclude``: image ids to skip."""
    if by not in ("oldest", "uncertainty"):
        raise ValueError("by must be 'oldest' or 'uncertainty'")
    skip = set(exclude)
    for row in worklist(session, status=status, sort=by, model_version_id=model_version_id):
        if row.image_id not in skip:
            return row
    return None


# --------------------------------------------------------------------------- fine-tune runs


def create_run(session: Session, args: dict[str, Any] | None = None) -> FinetuneRun:
    run = FinetuneRun(status="queued", progress=0.0, args=dict(args or {}))
    session.add(run)
    session.flush()
    return run


def _get_run(session: Session, run_id: int) -> FinetuneRun:
    run = session.get(FinetuneRun, run_id)
    if run is None:
        raise LookupError(f"no fine-tune run {run_id}")
    return run


def update_run_progress(
    session: Session,
    run_id: int,
    progress: float,
    message: str | None = None,
    pid: int | None = None,
) -> FinetuneRun:
    """Record progress (0..1); the first update marks the run running and started."""
    run = _get_run(session, run_id)
    if run.status in FINISHED_RUN_STATUSES:
        raise ValueError(f"fine-tune run {run_id} already {run.status}")
    if run.status == "queued":
        run.status = "running"
        run.started = utcnow()
    run.progress = min(1.0, max(0.0, float(progress)))
    if message is not None:
        run.message = message
    if pid is not None:
        run.pid = pid
    session.flush()
    return run


def finish_run(
    session: Session,
    run_id: int,
    status: str,
    message: str | None = None,
    model_version_id: int | None = None,
) -> FinetuneRun:
    if status not in FINISHED_RUN_STATUSES:
        raise ValueError(f"status must be one of {', '.join(FINISHED_RUN_STATUSES)}")
    run = _get_run(session, run_id)
    run.status = status
    run.finished = utcnow()
    if run.started is None:
        run.started = run.finished
    if status == "succeeded":
        run.progress = 1.0
    if message is not None:
        run.message = message
    if model_version_id is not None:
        run.model_version_id = model_version_id
    session.flush()
    return run


def get_run(session: Session, run_id: int) -> FinetuneRun | None:
    return session.get(FinetuneRun, run_id)


def list_runs(session: Session, limit: int | None = 50) -> list[FinetuneRun]:
    """Newest first."""
    stmt = select(FinetuneRun).order_by(FinetuneRun.id.desc())
    if limit is not None:
        stmt = stmt.limit(limit)
    return list(session.scalars(stmt))
