"""Who is using the app: the one seam where a real log-in replaces the name + role form.

Today the user types a name and picks a role in the sidebar; that becomes a ``users`` row
(``database.users.get_or_create_user``) and an :class:`Identity` kept in the session state.
A log-in later replaces :func:`sign_in` (and adds a password check) without touching the pages,
which only ever call :func:`current_user` and the ``can_*`` rules below.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from settings import ROLES as ROLES  # re-exported for app.py

ROLE_HELP = {
    "annotator": "corrects masks, saves drafts, submits for review",
    "radiologist": "corrects masks and approves or sends back submitted ones",
    "researcher": "corrects masks, saves drafts, submits for review",
}
SESSION_KEY = "infmap.identity"
MAX_NAME = 120


@dataclass(frozen=True)
class Identity:
    user_id: int
    name: str
    role: str


class IdentityError(ValueError):
    """A name/role that cannot be used; the message is for the user."""


def clean_name(name: str) -> str:
    name = " ".join((name or "").split())
    if not name:
        raise IdentityError("Enter your name before editing.")
    if len(name) > MAX_NAME:
        raise IdentityError(f"A name is at most {MAX_NAME} characters.")
    return name


def sign_in(
    state: MutableMapping[str, Any],
    name: str,
    role: str,
    session_scope: Callable[[], AbstractContextManager[Any]],
) -> Identity:
    """Validate, record the user in the database and remember them in ``state``."""
    from database import users

    name = clean_name(name)
    if role not in ROLES:
        raise IdentityError(f"Role must be one of {', '.join(ROLES)}.")
    with session_scope() as session:
        user = users.get_or_create_user(session, name, role)
        identity = Identity(user_id=int(user.id), name=user.name, role=user.role)
    state[SESSION_KEY] = identity
    return identity


def sign_out(state: MutableMapping[str, Any]) -> None:
    state.pop(SESSION_KEY, None)


def current_user(state: MutableMapping[str, Any]) -> Identity | None:
    """The signed-in user of this browser session, or None."""
    value = state.get(SESSION_KEY)
    return value if isinstance(value, Identity) else None


def can_edit(user: Identity | None) -> bool:
    return user is not None and user.role in ROLES


def can_review(user: Identity | None) -> bool:
    """Approve or send back a submitted version: radiologists only."""
    return user is not None and user.role == "radiologist"
