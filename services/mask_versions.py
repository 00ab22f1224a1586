"""Mask versions for the pages: the history of a (study, mask kind) as plain values
(``VersionInfo``), and saving, reviewing and moving on its head (``SaveOutcome``), each save in
the audit trail in its own transaction. A stale base is refused and the refused content kept as
its author's conflict draft (``save_version``, which ``services.reading_labels`` uses for
readings too)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from database import annotation_versions, audit, versioning
from database.models import User
from services.ingest import SessionFactory
from services.masks import dice

KIND_LABELS = {"lung": "Lung mask", "infection": "Infection mask"}
STATUS_LABELS = {
    "draft": "draft",
    "submitted": "submitted",
    "approved": "approved",
    "returned": "sent back",
}


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


def audit_save(session: Any, status: str, user: User, image_id: int, detail: str) -> None:
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
                audit_save(session, status, user, image_id, f"{what} version {new_id}")
    except versioning.StaleVersionError as refused:
        with scope() as session:
            user = signed_in_user(session, user_id)
            kept = refused.kept_as(int(keep_draft(session, user).id))
            if audit_as is not None:  # a saved version too: in the trail, same transaction
                _, image_id, what = audit_as
                audit_save(session, "draft", user, image_id,
                           f"{what} version {kept.conflict_version_id} (conflict draft)")
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
            audit_save(session, status, reviewer, image_id, f"{kind} mask version {new_id}")
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
            audit_save(session, "submitted", author, image_id, f"{kind} mask version {done}")
    except versioning.StaleVersionError as exc:
        return SaveOutcome(False, None, str(exc))
    except (ValueError, LookupError) as exc:
        return SaveOutcome(False, None, str(exc))
    return SaveOutcome(
        True, done, f"Submitted for review: {KIND_LABELS[kind].lower()} version {done}."
    )
