"""Who is using the app: the one seam between a log-in and the pages.

Two ways in, both ending in an :class:`Identity` kept in the browser session's state:

- **local accounts** (the embedded default): name + password checked against the argon2id hash
  in ``users`` (:func:`sign_in`); accounts are made with ``python -m database.users add`` or by
  an admin in the app, the first admin by :func:`create_first_admin` while none exists;
- **OIDC** through Streamlit's ``st.login`` (configured in ``.streamlit/secrets.toml``): app.py
  hands the provider's e-mail to :func:`sign_in_external`, which admits it only if an account
  of that name exists (its role comes from the account, never from the provider).

A session ends after ``INFMAP_SESSION_MINUTES`` idle minutes (:func:`current_user`). Pages only
call :func:`current_user` and the ``can_*`` rules; the services check the role again against
the database (``database.users.acting_user``), so a forged call is refused too. Sign-in, its
refusal and sign-out go to the audit trail.
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import settings
from settings import ROLES as ROLES  # re-exported for app.py

ROLE_HELP = {
    "annotator": "corrects masks and readings, saves drafts, submits for review",
    "radiologist": "also approves or sends back submitted masks and readings",
    "researcher": "also starts fine-tuning and activates or rolls back model versions",
    "admin": "manages accounts, reads the audit trail, manages model versions",
}
REVIEWERS = ("radiologist",)  # approve / send back
MODEL_MANAGERS = ("researcher", "admin")  # start fine-tuning, activate, roll back, re-predict
USER_MANAGERS = ("admin",)  # accounts and the audit trail
EXPORTERS = ("radiologist", "researcher", "admin")  # the dataset export
SESSION_KEY = "infmap.identity"
SEEN_KEY = "infmap.identity.seen"
TIMED_OUT_KEY = "infmap.identity.timed_out"
MAX_NAME = 120
WRONG = "Wrong name or password."

Scope = Callable[..., AbstractContextManager[Any]]


@dataclass(frozen=True)
class Identity:
    user_id: int
    name: str
    role: str


class IdentityError(ValueError):
    """A sign-in that cannot be accepted; the message is for the user."""


def clean_name(name: str) -> str:
    name = " ".join((name or "").split())
    if not name:
        raise IdentityError("Enter your name.")
    if len(name) > MAX_NAME:
        raise IdentityError(f"A name is at most {MAX_NAME} characters.")
    return name


def _remember(state: MutableMapping[str, Any], identity: Identity) -> Identity:
    state[SESSION_KEY] = identity
    state[SEEN_KEY] = time.time()
    state.pop(TIMED_OUT_KEY, None)
    return identity


def sign_in(
    state: MutableMapping[str, Any], name: str, password: str, scope: Scope
) -> Identity:
    """Check the password of the account ``name``; remember the user in ``state``."""
    from database import audit, users

    name = clean_name(name)
    identity = None
    with scope() as session:
        user = users.authenticate(session, name, password or "")
        if user is None:
            audit.record(session, "sign-in refused", None, user_name=name)
        else:
            audit.record(session, "sign-in", user)
            identity = Identity(user_id=int(user.id), name=user.name, role=user.role)
    if identity is None:  # after the commit: the refusal stays in the audit trail
        raise IdentityError(WRONG)
    return _remember(state, identity)


def sign_in_external(
    state: MutableMapping[str, Any], name: str, scope: Scope, provider: str = "OIDC"
) -> Identity:
    """A user the identity provider vouched for (``st.login``): admitted only with an account."""
    from database import audit, users

    name = clean_name(name)
    identity = None
    with scope() as session:
        user = users.get_user(session, name)
        if user is None:
            audit.record(session, "sign-in refused", None, user_name=name, detail=provider)
        else:
            audit.record(session, "sign-in", user, detail=provider)
            identity = Identity(user_id=int(user.id), name=user.name, role=user.role)
    if identity is None:
        raise IdentityError(f"No InfMap account for {name}: ask an admin to create one.")
    return _remember(state, identity)


def needs_first_admin(scope: Scope) -> bool:
    """True while no admin account with a password exists (a fresh install)."""
    from database import users

    with scope(write=False) as session:
        return not users.admin_exists(session)


def create_first_admin(
    state: MutableMapping[str, Any], name: str, password: str, repeat: str, scope: Scope
) -> Identity:
    """The one-time prompt of a fresh install: refused as soon as an admin exists."""
    from database import audit, users
    from database.session import serialize_writers

    name = clean_name(name)
    if password != repeat:
        raise IdentityError("The two passwords differ.")
    with scope() as session:
        serialize_writers(session, "first admin")
        if users.admin_exists(session):
            raise IdentityError("An admin account exists already: sign in.")
        try:
            user = users.create_user(session, name, "admin", password, by=None)
        except users.AccountError as exc:
            raise IdentityError(str(exc)) from exc
        audit.record(session, "user create", user, detail=f"{user.name} (admin, first start)")
        audit.record(session, "sign-in", user)
        identity = Identity(user_id=int(user.id), name=user.name, role=user.role)
    return _remember(state, identity)


def sign_out(state: MutableMapping[str, Any], scope: Scope | None = None) -> None:
    user = state.pop(SESSION_KEY, None)
    state.pop(SEEN_KEY, None)
    if scope is not None and isinstance(user, Identity):
        from database import audit, users

        with scope() as session:
            audit.record(session, "sign-out", users.acting_user(session, user.user_id, None, ""))


def current_user(state: MutableMapping[str, Any]) -> Identity | None:
    """The signed-in user of this browser session, or None (also once the session idled
    longer than ``INFMAP_SESSION_MINUTES``; ``TIMED_OUT_KEY`` then says so)."""
    value = state.get(SESSION_KEY)
    if not isinstance(value, Identity):
        return None
    now = time.time()
    if now - float(state.get(SEEN_KEY, now)) > settings.session_minutes() * 60:
        sign_out(state)
        state[TIMED_OUT_KEY] = True
        return None
    state[SEEN_KEY] = now
    return value


def can_edit(user: Identity | None) -> bool:
    return user is not None and user.role in ROLES


def can_review(user: Identity | None) -> bool:
    """Approve or send back a submitted version: radiologists only."""
    return user is not None and user.role in REVIEWERS


def can_manage_models(user: Identity | None) -> bool:
    return user is not None and user.role in MODEL_MANAGERS


def can_export(user: Identity | None) -> bool:
    return user is not None and user.role in EXPORTERS


def can_manage_users(user: Identity | None) -> bool:
    return user is not None and user.role in USER_MANAGERS
