"""Annotation versions: append-only human masks per (image, kind), and who may save what (the
rules shared with readings, and ``RoleError``/``StaleVersionError``, are ``database.versioning``).

Concurrency rule: the *head* of (image, kind) is its newest non-conflict version. A save names
the head it was drawn on (``base_version_id``; None when there is no head yet). If another save
got in first, ``save_annotation`` writes nothing and raises ``StaleVersionError``; the caller
keeps the refused mask with ``save_conflict_draft`` in a transaction of its own (a ``draft``
with ``conflict=True`` whose parent is the version it was drawn on), so nothing drawn is lost
and no function here commits. On SQLite, write sessions begin with ``BEGIN IMMEDIATE`` (see
``database.session``), so the head check and the insert happen under one write lock; on other
databases the image row is locked ``FOR UPDATE``.

Every function takes a Session; the caller owns the transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from database.masks import mask_to_png, png_to_mask
from database.models import MASK_KINDS, AnnotationVersion, User
from database.versioning import (
    check_base,
    check_head,
    check_prediction,
    check_status,
    known_statuses,
    lock_image,
    mark_submitted,
    require_radiologist,
)

log = logging.getLogger(__name__)


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


def _check_save(
    session: Session,
    image_id: int,
    kind: str,
    mask: np.ndarray,
    base_version_id: int | None,
    prediction_id: int | None,
) -> None:
    image = lock_image(session, image_id)
    if np.shape(mask) != (image.height, image.width):
        raise ValueError(
            f"the mask has shape {np.shape(mask)}, the image is {image.height}x{image.width}"
        )
    if base_version_id is not None:
        base = session.get(AnnotationVersion, base_version_id)
        if base is None or base.image_id != image_id or base.kind != kind:
            raise ValueError(f"version {base_version_id} is not a {kind} mask of this image")
    check_prediction(session, image_id, prediction_id)


def _append(
    session: Session,
    image_id: int,
    kind: str,
    mask_png: bytes,
    author: User,
    status: str,
    parent_id: int | None,
    prediction_id: int | None,
    comment: str | None,
    conflict: bool = False,
) -> AnnotationVersion:
    version = AnnotationVersion(
        image_id=image_id,
        kind=kind,
        mask_png=mask_png,
        author_id=author.id,
        status=status,
        parent_id=parent_id,
        prediction_id=prediction_id,
        conflict=conflict,
        comment=comment,
    )
    session.add(version)
    session.flush()
    return version


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

    Raises ``StaleVersionError`` (having written nothing) when it is not; keep the mask with
    ``save_conflict_draft``. ``approved``/``returned`` require a radiologist.
    """
    _check_kind(kind)
    check_status(status, author, "mask")
    _check_save(session, image_id, kind, mask, base_version_id, prediction_id)
    check_base(image_id, kind, head_version(session, image_id, kind), base_version_id)
    return _append(
        session, image_id, kind, mask_to_png(mask), author, status, base_version_id,
        prediction_id, comment,
    )


def save_conflict_draft(
    session: Session,
    image_id: int,
    kind: str,
    mask: np.ndarray,
    author: User,
    base_version_id: int | None,
    comment: str | None = None,
    prediction_id: int | None = None,
) -> AnnotationVersion:
    """Keep a refused mask as the author's conflict draft (never a head), parent = its base."""
    _check_kind(kind)
    _check_save(session, image_id, kind, mask, base_version_id, prediction_id)
    draft = _append(
        session, image_id, kind, mask_to_png(mask), author, "draft", base_version_id,
        prediction_id, comment, conflict=True,
    )
    log.info("kept a refused save on image %s %s as draft %s", image_id, kind, draft.id)
    return draft


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
    require_radiologist(reviewer, status, "mask")
    lock_image(session, image_id)
    head = check_head(image_id, kind, head_version(session, image_id, kind), base_version_id,
                      "review")
    return _append(
        session, image_id, kind, head.mask_png, reviewer, status, head.id, head.prediction_id,
        comment,
    )


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


def submit_draft(
    session: Session, image_id: int, kind: str, submitter: User, base_version_id: int
) -> AnnotationVersion:
    """Submit the head draft for review as it is: its status becomes ``submitted`` in place.

    The one change a saved version may undergo (draft -> submitted, same mask, same author):
    a second version with an identical mask would only be noise in the history. A changed mask
    is saved as a new version instead (``save_annotation``).
    """
    _check_kind(kind)
    lock_image(session, image_id)
    head = check_head(image_id, kind, head_version(session, image_id, kind), base_version_id,
                      "submit")
    mark_submitted(session, head)
    log.info("image %s %s: draft %s submitted by user %s", image_id, kind, head.id, submitter.id)
    return head


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
    wanted = known_statuses(statuses)
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

