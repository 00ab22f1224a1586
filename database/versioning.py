"""The rules human masks (``database.annotation_versions``) and readings
(``database.reading_versions``) share: append-only versions per study, a head that a save must
name, refusals as ``StaleVersionError``, review statuses for radiologists only, and the one
in-place change (a draft becomes submitted).

Every function takes a Session; the caller owns the transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from typing import TypeVar

from sqlalchemy import update
from sqlalchemy.orm import Session

from database.models import (
    ANNOTATION_STATUSES,
    REVIEW_STATUSES,
    AnnotationVersion,
    Image,
    Prediction,
    ReadingVersion,
    User,
)

log = logging.getLogger(__name__)

Version = AnnotationVersion | ReadingVersion
V = TypeVar("V", AnnotationVersion, ReadingVersion)


class RoleError(PermissionError):
    """The user's role does not allow this action."""


class StaleVersionError(Exception):
    """A save was based on a version that is no longer the head of (image, kind).

    ``kind`` is a mask kind or ``"reading"``. ``conflict_version_id`` is the draft the refused
    mask or reading was kept as (None until the caller kept it, and for review actions, which
    draw nothing).
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
        what = "reading" if kind == "reading" else f"{kind} mask"
        mine = "reading" if kind == "reading" else "mask"
        message = (
            f"{head_author} saved a newer {what} ({head_status}, version {head_id}) at "
            f"{when}, after the version you started from."
        )
        if conflict_version_id is not None:
            message += (
                f" Your {mine} was kept as draft version {conflict_version_id}; "
                "open the latest version to merge your changes."
            )
        super().__init__(message)

    def kept_as(self, conflict_version_id: int) -> StaleVersionError:
        """The same refusal, saying which conflict draft the mask or reading was kept as."""
        return StaleVersionError(
            image_id=self.image_id,
            kind=self.kind,
            base_version_id=self.base_version_id,
            head_id=self.head_id,
            head_author=self.head_author,
            head_status=self.head_status,
            head_created=self.head_created,
            conflict_version_id=conflict_version_id,
        )


def stale(
    image_id: int, kind: str, base_version_id: int | None, head: Version
) -> StaleVersionError:
    """The refusal of a save made on ``base_version_id`` while ``head`` is the head."""
    return StaleVersionError(
        image_id=image_id,
        kind=kind,
        base_version_id=base_version_id,
        head_id=head.id,
        head_author=head.author.name,
        head_status=head.status,
        head_created=head.created,
        conflict_version_id=None,
    )


def check_base(
    image_id: int, kind: str, head: Version | None, base_version_id: int | None
) -> None:
    """A save made on ``base_version_id`` goes ahead only while that is the head (None: while
    there is none); otherwise the refusal, having written nothing."""
    if (head.id if head is not None else None) != base_version_id:
        assert head is not None  # a valid base implies a head exists
        log.info("refused stale save on image %s (%s)", image_id, kind)
        raise stale(image_id, kind, base_version_id, head)


def lock_image(session: Session, image_id: int) -> Image:
    # FOR UPDATE serialises savers on PostgreSQL; SQLite already holds its write lock.
    image = session.get(Image, image_id, with_for_update=True)
    if image is None:
        raise LookupError(f"no image {image_id}")
    return image


def check_prediction(session: Session, image_id: int, prediction_id: int | None) -> None:
    if prediction_id is not None:
        pred = session.get(Prediction, prediction_id)
        if pred is None or pred.image_id != image_id:
            raise ValueError(f"prediction {prediction_id} is not of this image")


def check_status(status: str, author: User, what: str) -> None:
    """A known status, and a review status (approved, returned) only from a radiologist.
    ``what`` names the thing in the message ("mask", "reading")."""
    if status not in ANNOTATION_STATUSES:
        raise ValueError(f"status must be one of {', '.join(ANNOTATION_STATUSES)}, not {status!r}")
    if status in REVIEW_STATUSES:
        require_radiologist(author, status, what)


def require_radiologist(user: User, status: str, what: str) -> None:
    if user.role != "radiologist":
        raise RoleError(f"only a radiologist may mark a {what} {status}")


def known_statuses(statuses: Iterable[str]) -> set[str]:
    """``statuses`` as a set; a ValueError names any that is not a version status."""
    wanted = set(statuses)
    bad = wanted - set(ANNOTATION_STATUSES)
    if bad:
        raise ValueError(f"unknown statuses {sorted(bad)}")
    return wanted


def check_head(
    image_id: int, kind: str, head: V | None, base_version_id: int | None, action: str
) -> V:
    """``head`` when a review or submission (``action``) names it as its base; else the refusal."""
    what = "reading" if kind == "reading" else f"{kind} mask"
    if head is None:
        raise ValueError(f"there is no {what} to {action} for this image")
    if head.id != base_version_id:
        raise stale(image_id, kind, base_version_id, head)
    return head


def mark_submitted(session: Session, head: Version) -> None:
    """The one change a saved version may undergo: the head draft becomes ``submitted`` (same
    content, same author; a second, identical version would only be noise in the history)."""
    if head.status != "draft":
        raise ValueError(f"version {head.id} is {head.status}, not a draft")
    table = type(head)
    # A targeted UPDATE: the ORM flush path stays append-only (models' before_update guard).
    session.execute(
        update(table)
        .where(table.id == head.id, table.status == "draft")
        .values(status="submitted")
        .execution_options(synchronize_session="fetch")
    )
    session.refresh(head)
