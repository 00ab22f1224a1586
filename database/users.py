"""Users: who saved what. Every function takes a Session; the caller owns the transaction."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from database.models import ROLES, User


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


