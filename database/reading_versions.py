"""Reading versions: append-only readings (label + free-text finding) per study, and who may
save what. The same rules as ``database.annotation_versions`` for masks (``database.versioning``):

- the *head* of a study is its newest non-conflict reading version; a save names the head it
  was made on (``base_version_id``; None when there is none yet). If another save got in first,
  ``save_reading`` writes nothing and raises ``StaleVersionError`` (kind ``"reading"``); the
  caller keeps the refused reading with ``save_conflict_reading_draft`` in a transaction of its
  own (a ``draft`` with ``conflict=True`` whose parent is its base);
- statuses draft -> submitted -> approved / returned; approving and sending back are for
  radiologists; ``submit_reading_draft`` is the one in-place change (a draft becomes submitted);
- for readers and fine-tuning the current reading is the newest approved, else submitted,
  version (a later "returned" vetoes what it sent back; later drafts do not count).

Every function takes a Session; the caller owns the transaction. No finding text is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from database.models import REVIEW_STATUSES, ReadingVersion, User
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
from settings import READING_LABELS

log = logging.getLogger(__name__)

KIND = "reading"  # the ``kind`` a StaleVersionError names for readings
MAX_FINDING_CHARS = 4000


def _clean(label: str, finding: str | None) -> tuple[str, str | None]:
    if label not in READING_LABELS:
        raise ValueError(f"label must be one of {', '.join(READING_LABELS)}, not {label!r}")
    text = (finding or "").strip() or None
    if text is not None and len(text) > MAX_FINDING_CHARS:
        raise ValueError(f"the finding is longer than {MAX_FINDING_CHARS} characters")
    return label, text


def head_reading(session: Session, image_id: int) -> ReadingVersion | None:
    """The newest non-conflict reading version of a study, or None."""
    return session.scalar(
        select(ReadingVersion)
        .where(ReadingVersion.image_id == image_id, ReadingVersion.conflict.is_(False))
        .order_by(ReadingVersion.id.desc())
        .limit(1)
    )


def _check_refs(
    session: Session, image_id: int, base_version_id: int | None, prediction_id: int | None
) -> None:
    lock_image(session, image_id)
    if base_version_id is not None:
        base = session.get(ReadingVersion, base_version_id)
        if base is None or base.image_id != image_id:
            raise ValueError(f"version {base_version_id} is not a reading of this image")
    check_prediction(session, image_id, prediction_id)


def _append(session: Session, **values: object) -> ReadingVersion:
    version = ReadingVersion(**values)
    session.add(version)
    session.flush()
    return version


def save_reading(
    session: Session,
    image_id: int,
    label: str,
    finding: str | None,
    author: User,
    status: str,
    base_version_id: int | None,
    comment: str | None = None,
    prediction_id: int | None = None,
) -> ReadingVersion:
    """Append a reading made on ``base_version_id``, which must be the head.

    Raises ``StaleVersionError`` (having written nothing) when it is not; keep the reading with
    ``save_conflict_reading_draft``. ``approved``/``returned`` require a radiologist.
    """
    label, finding = _clean(label, finding)
    check_status(status, author, "reading")
    _check_refs(session, image_id, base_version_id, prediction_id)
    check_base(image_id, KIND, head_reading(session, image_id), base_version_id)
    return _append(
        session, image_id=image_id, label=label, finding=finding, author_id=author.id,
        status=status, parent_id=base_version_id, prediction_id=prediction_id, conflict=False,
        comment=comment,
    )


def save_conflict_reading_draft(
    session: Session,
    image_id: int,
    label: str,
    finding: str | None,
    author: User,
    base_version_id: int | None,
    comment: str | None = None,
    prediction_id: int | None = None,
) -> ReadingVersion:
    """Keep a refused reading as the author's conflict draft (never a head), parent = its base."""
    label, finding = _clean(label, finding)
    _check_refs(session, image_id, base_version_id, prediction_id)
    draft = _append(
        session, image_id=image_id, label=label, finding=finding, author_id=author.id,
        status="draft", parent_id=base_version_id, prediction_id=prediction_id, conflict=True,
        comment=comment,
    )
    log.info("kept a refused reading on image %s as draft %s", image_id, draft.id)
    return draft


def review_reading(
    session: Session,
    image_id: int,
    reviewer: User,
    status: str,
    base_version_id: int,
    comment: str | None = None,
) -> ReadingVersion:
    """A radiologist approves (``status="approved"``) or sends back (``"returned"``) the head:
    a new version with the head's label and finding."""
    if status not in REVIEW_STATUSES:
        raise ValueError(f"a review is one of {', '.join(REVIEW_STATUSES)}, not {status!r}")
    require_radiologist(reviewer, status, "reading")
    lock_image(session, image_id)
    head = check_head(image_id, KIND, head_reading(session, image_id), base_version_id, "review")
    return _append(
        session, image_id=image_id, label=head.label, finding=head.finding,
        author_id=reviewer.id, status=status, parent_id=head.id,
        prediction_id=head.prediction_id, conflict=False, comment=comment,
    )


def submit_reading_draft(
    session: Session, image_id: int, submitter: User, base_version_id: int
) -> ReadingVersion:
    """Submit the head draft for review as it is: its status becomes ``submitted`` in place
    (the one change a saved reading may undergo, as for masks)."""
    lock_image(session, image_id)
    head = check_head(image_id, KIND, head_reading(session, image_id), base_version_id, "submit")
    mark_submitted(session, head)
    log.info("image %s: reading draft %s submitted by user %s", image_id, head.id, submitter.id)
    return head


def list_readings(session: Session, image_id: int) -> list[ReadingVersion]:
    """All reading versions of a study (conflict drafts included), oldest first."""
    return list(
        session.scalars(
            select(ReadingVersion)
            .where(ReadingVersion.image_id == image_id)
            .order_by(ReadingVersion.id)
        )
    )


def current_readings(
    session: Session,
    statuses: Sequence[str] = ("submitted", "approved"),
    image_ids: Sequence[int] | None = None,
) -> dict[int, ReadingVersion]:
    """Per study, the newest non-conflict reading among ``statuses`` that no later ``returned``
    version vetoes; an approved version wins over a newer submitted one (readers see what was
    approved until the revision is approved too)."""
    wanted = known_statuses(statuses)
    found: dict[int, ReadingVersion] = {}
    for status in ("submitted", "approved"):  # approved last: it wins where both exist
        if status not in wanted:
            continue
        considered = [status, "returned"]
        latest = (
            select(ReadingVersion.image_id, func.max(ReadingVersion.id).label("vid"))
            .where(ReadingVersion.conflict.is_(False), ReadingVersion.status.in_(considered))
            .group_by(ReadingVersion.image_id)
            .subquery()
        )
        stmt = (
            select(ReadingVersion)
            .join(latest, ReadingVersion.id == latest.c.vid)
            .where(ReadingVersion.status == status)
        )
        if image_ids is not None:
            stmt = stmt.where(ReadingVersion.image_id.in_(list(image_ids)))
        for v in session.scalars(stmt):
            found[v.image_id] = v
    return dict(sorted(found.items()))


def training_readings(
    session: Session, statuses: Sequence[str] = ("submitted", "approved")
) -> list[ReadingVersion]:
    """For fine-tuning, as ``annotation_versions.training_annotations`` for masks: per study the
    newest non-conflict reading among ``statuses``; a later ``returned`` vetoes it, later
    drafts do not. Ordered by image."""
    wanted = known_statuses(statuses)
    latest = (
        select(ReadingVersion.image_id, func.max(ReadingVersion.id).label("vid"))
        .where(
            ReadingVersion.conflict.is_(False),
            ReadingVersion.status.in_(sorted(wanted | {"returned"})),
        )
        .group_by(ReadingVersion.image_id)
        .subquery()
    )
    stmt = (
        select(ReadingVersion)
        .join(latest, ReadingVersion.id == latest.c.vid)
        .where(ReadingVersion.status.in_(sorted(wanted)))
        .order_by(ReadingVersion.image_id)
    )
    return list(session.scalars(stmt))
