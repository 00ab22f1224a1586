"""The audit trail for the pages: recording views, uploads and exports, and reading it back
(admins only) as rows and as CSV. The saves, reviews, sign-ins and model actions record
themselves in the services that make them (``services.studies``, ``services.reading_labels``,
``services.identity``, ``services.model_admin``)."""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from database import audit, users
from database.models import AUDIT_ACTIONS
from services.identity import USER_MANAGERS
from services.ingest import SessionFactory

ACTIONS = AUDIT_ACTIONS
COLUMNS = ("time (UTC)", "user", "action", "study", "detail")


NOT_SIGNED_IN = "(not signed in)"


def record(
    scope: SessionFactory, user_id: int | None, action: str,
    image_id: int | None = None, detail: str | None = None,
) -> None:  # fmt: skip
    """One event (a view, an upload, an export) by a signed-in user, or by nobody signed in."""
    with scope() as s:
        user = users.acting_user(s, user_id, None, action) if user_id is not None else None
        audit.record(s, action, user, user_name=NOT_SIGNED_IN, image_id=image_id,
                     detail=detail)


def events(
    scope: SessionFactory,
    by_user_id: int,
    user_name: str | None = None,
    actions: tuple[str, ...] = (),
    since: date | None = None,
    until: date | None = None,
    image_id: int | None = None,
) -> list[dict[str, Any]]:
    """Events newest first, filtered; ``until`` is inclusive (whole UTC days)."""
    where = audit.EventFilter(
        user_name=user_name or None, actions=actions, image_id=image_id,
        since=datetime.combine(since, time(), UTC) if since else None,
        until=datetime.combine(until + timedelta(days=1), time(), UTC) if until else None,
    )  # fmt: skip
    with scope(write=False) as s:
        users.acting_user(s, by_user_id, USER_MANAGERS, "read the audit trail")
        return [{
            "time (UTC)": e.at.strftime("%Y-%m-%d %H:%M:%S"), "user": e.user_name,
            "action": e.action, "study": e.image_id, "detail": e.detail or "",
        } for e in audit.list_events(s, where)]  # fmt: skip


def user_names(scope: SessionFactory, by_user_id: int) -> list[str]:
    with scope(write=False) as s:
        users.acting_user(s, by_user_id, USER_MANAGERS, "read the audit trail")
        return [u.name for u in users.list_users(s)]


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        # A cell starting with = + - @ is a formula in a spreadsheet: quote it as text.
        writer.writerow({k: (f"'{v}" if isinstance(v, str) and v and v[0] in "=+-@" else v)
                         for k, v in row.items()})  # fmt: skip
    return out.getvalue()
