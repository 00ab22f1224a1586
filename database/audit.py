"""The audit trail: who signed in, viewed, saved, submitted, approved, imported, exported, started
or activated a model, and when. Append-only (``AuditEvent``). Every function takes a Session; the
caller owns the transaction, so an event is written in the same transaction as the change it
records and the two stand or fall together.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from database.models import AUDIT_ACTIONS, AuditEvent, User

MAX_DETAIL = 500


def record(
    session: Session,
    action: str,
    user: User | None,
    *,
    user_name: str | None = None,
    image_id: int | None = None,
    detail: str | None = None,
) -> AuditEvent:
    """Append one event. ``user_name`` is for events without an account (a refused sign-in,
    the command line); ``detail`` must not carry file names or patient data."""
    if action not in AUDIT_ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    name = user.name if user is not None else (user_name or "")
    event = AuditEvent(
        action=action, user_id=user.id if user is not None else None,
        user_name=name[:120], image_id=image_id,
        detail=(detail or None) and detail[:MAX_DETAIL],
    )  # fmt: skip
    session.add(event)
    session.flush()
    return event


@dataclass(frozen=True)
class EventFilter:
    user_name: str | None = None
    actions: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None  # exclusive
    image_id: int | None = None
    limit: int | None = 5000


def list_events(session: Session, where: EventFilter = EventFilter()) -> list[AuditEvent]:
    """Newest first."""
    query = select(AuditEvent)
    if where.user_name:
        query = query.where(AuditEvent.user_name == where.user_name)
    if where.actions:
        query = query.where(AuditEvent.action.in_(where.actions))
    if where.since is not None:
        query = query.where(AuditEvent.at >= where.since)
    if where.until is not None:
        query = query.where(AuditEvent.at < where.until)
    if where.image_id is not None:
        query = query.where(AuditEvent.image_id == where.image_id)
    query = query.order_by(AuditEvent.id.desc())
    if where.limit is not None:
        query = query.limit(where.limit)
    return list(session.scalars(query))
