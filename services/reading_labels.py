"""The reader's reading of a study (label + free-text finding) for the pages: read, save with
the stale-save refusal, review, and compare with the model's class.

Not ``services.readings``, which is about which human *masks* readers see. Storage is
``database.reading_versions`` (append-only versions, the masks' draft -> submitted -> approved
flow). Everything returned is a plain, picklable value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from database import reading_versions, versioning
from services.ingest import SessionFactory
from services.mask_versions import (
    STATUS_LABELS,
    SaveOutcome,
    audit_save,
    save_version,
    signed_in_user,
)
from settings import READING_CLASSES, READING_LABELS

# How each label reads on screen (the stored value is the key).
LABEL_TEXT: dict[str, str] = {
    "COVID-19": "COVID-19",
    "Non-COVID": "Non-COVID pneumonia",
    "Normal": "Normal",
    "other finding": "Other finding",
    "not assessable": "Not assessable",
}
assert tuple(LABEL_TEXT) == READING_LABELS


@dataclass(frozen=True)
class ReadingInfo:
    id: int
    image_id: int
    label: str
    finding: str | None
    status: str
    author: str
    author_role: str
    created: datetime
    parent_id: int | None
    conflict: bool
    comment: str | None

    @property
    def label_text(self) -> str:
        return LABEL_TEXT.get(self.label, self.label)

    def describe(self) -> str:
        when = self.created.strftime("%Y-%m-%d %H:%M UTC")
        return (
            f"{self.label_text} · {STATUS_LABELS.get(self.status, self.status)} · version "
            f"{self.id} by {self.author} ({self.author_role}), {when}"
        )


def _info(v: Any) -> ReadingInfo:
    return ReadingInfo(
        id=v.id, image_id=v.image_id, label=v.label, finding=v.finding, status=v.status,
        author=v.author.name, author_role=v.author.role, created=v.created,
        parent_id=v.parent_id, conflict=bool(v.conflict), comment=v.comment,
    )


def head_reading(scope: SessionFactory, image_id: int) -> ReadingInfo | None:
    with scope(write=False) as session:
        head = reading_versions.head_reading(session, image_id)
        return None if head is None else _info(head)


def list_readings(scope: SessionFactory, image_id: int) -> list[ReadingInfo]:
    """All reading versions of a study, oldest first (conflict drafts included)."""
    with scope(write=False) as session:
        return [_info(v) for v in reading_versions.list_readings(session, image_id)]


def current_readings(scope: SessionFactory) -> dict[int, ReadingInfo]:
    """Per study, the reading readers see: the newest approved, else submitted, version."""
    with scope(write=False) as session:
        return {i: _info(v) for i, v in reading_versions.current_readings(session).items()}


def agreement(reading: ReadingInfo | None, predicted_class: str | None) -> str:
    """"agrees" / "disagrees" when the reading is one of the model's classes and there is a
    prediction; "" otherwise (no reading, other finding, not assessable, no prediction)."""
    if reading is None or predicted_class is None or reading.label not in READING_CLASSES:
        return ""
    return "agrees" if reading.label == predicted_class else "disagrees"


def worklist_columns(
    image_id: int, predicted_class: str | None, current: Mapping[int, ReadingInfo]
) -> dict[str, str]:
    """The worklist's reading column and its agreement mark for one study."""
    reading = current.get(image_id)
    if reading is None:
        return {"reading": "", "agreement": ""}
    status = "" if reading.status == "approved" else f" ({STATUS_LABELS[reading.status]})"
    mark = {"agrees": "✓ agrees", "disagrees": "✗ disagrees"}.get(
        agreement(reading, predicted_class), ""
    )
    return {"reading": f"{reading.label_text}{status}", "agreement": mark}


def save_reading(
    scope: SessionFactory,
    image_id: int,
    label: str,
    finding: str | None,
    user_id: int,
    status: str,
    base_version_id: int | None,
    comment: str | None = None,
    prediction_id: int | None = None,
) -> SaveOutcome:
    """Append a reading made on ``base_version_id``. A stale base is refused; the reading is
    then kept as the author's conflict draft (a transaction of its own) and the outcome's
    message names it."""
    comment = (comment or "").strip() or None
    if status == "returned" and not comment:
        return SaveOutcome(False, None, "Say what needs changing: a comment is required.")
    word = {"draft": "Reading saved as a draft", "submitted": "Reading submitted for review"}.get(
        status, f"Reading saved as {STATUS_LABELS.get(status, status)}"
    )
    return save_version(
        scope,
        user_id,
        lambda session, user: reading_versions.save_reading(
            session, image_id, label, finding, user, status, base_version_id, comment=comment,
            prediction_id=prediction_id,
        ),
        lambda session, user: reading_versions.save_conflict_reading_draft(
            session, image_id, label, finding, user, base_version_id, comment=comment,
            prediction_id=prediction_id,
        ),
        lambda new_id: f"{word}: version {new_id}.",
        (status, image_id, "reading"),
    )


def change_reading_status(
    scope: SessionFactory,
    image_id: int,
    user_id: int,
    status: str,
    base_version_id: int,
    comment: str | None = None,
) -> SaveOutcome:
    """An unchanged head moves on: approved or sent back (a review version), or submitted (a
    draft changes its status in place; a sent-back reading is resubmitted as a new version)."""
    comment = (comment or "").strip() or None
    try:
        if status in ("approved", "returned"):
            if status == "returned" and not comment:
                return SaveOutcome(False, None, "Say what needs changing: a comment is required.")
            with scope() as session:
                reviewer = signed_in_user(session, user_id)
                version = reading_versions.review_reading(
                    session, image_id, reviewer, status, base_version_id, comment,
                )
                done = int(version.id)
                audit_save(session, status, reviewer, image_id, f"reading version {done}")
            word = "Reading approved" if status == "approved" else "Reading sent back"
            return SaveOutcome(True, done, f"{word}: version {done}.")
        if status != "submitted":
            raise ValueError(f"unknown status change {status!r}")
        with scope(write=False) as session:
            head = reading_versions.head_reading(session, image_id)
            head_status = None if head is None else head.status
            label, finding = (head.label, head.finding) if head is not None else ("", None)
        if head_status in ("submitted", "approved"):
            return SaveOutcome(
                False, None,
                f"Nothing to submit: reading version {base_version_id} is already {head_status}.",
            )
        if head_status == "returned":  # resubmitted as it is: a new round of review
            return save_reading(scope, image_id, label, finding, user_id, "submitted",
                                base_version_id, comment)
        with scope() as session:
            author = signed_in_user(session, user_id)
            version = reading_versions.submit_reading_draft(
                session, image_id, author, base_version_id
            )
            done = int(version.id)
            audit_save(session, "submitted", author, image_id, f"reading version {done}")
        return SaveOutcome(True, done, f"Reading submitted for review: version {done}.")
    except versioning.StaleVersionError as exc:
        return SaveOutcome(False, None, str(exc))
    except (versioning.RoleError, ValueError, LookupError) as exc:
        return SaveOutcome(False, None, str(exc))


def history_table(versions: list[ReadingInfo]) -> list[dict[str, Any]]:
    """Rows for the reading history, newest first."""
    return [
        {
            "version": v.id,
            "reading": v.label_text,
            "finding": v.finding or "",
            "status": STATUS_LABELS.get(v.status, v.status)
            + (" (conflict draft)" if v.conflict else ""),
            "author": f"{v.author} ({v.author_role})",
            "saved (UTC)": v.created.strftime("%Y-%m-%d %H:%M:%S"),
            "made on": "—" if v.parent_id is None else f"v{v.parent_id}",
            "comment": v.comment or "",
        }
        for v in reversed(versions)
    ]
