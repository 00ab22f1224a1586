"""The app's database as the services and pages see it: one engine per database URL and the
session factory (``scope``) every service takes, so pages never touch sessions or SQL."""

from __future__ import annotations

import errno
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from database.images import PayloadError
from database.session import init_db, session_scope


@dataclass(frozen=True)
class Store:
    engine: Engine

    def scope(self, write: bool = True) -> AbstractContextManager[Any]:
        """A session in one transaction (``database.session.session_scope``)."""
        return session_scope(self.engine, write=write)


def open_store(url: str) -> Store:
    """Open (creating and migrating if needed) the database at ``url``."""
    return Store(init_db(url))


# SQLite's words for the failures an administrator must fix, and what to tell the user.
_DATABASE_PROBLEMS = (
    (
        "readonly",
        "The database is read-only, so nothing can be saved. Ask the administrator to "
        "check the permissions of the database file and its folder.",
    ),
    (
        "full",
        "The disk holding the database is full, so nothing can be saved. Ask the "
        "administrator to free some space.",
    ),
    (
        "unable to open",
        "The database file cannot be opened. Ask the administrator to check that "
        "it exists and can be read.",
    ),
    ("locked", "The database is busy with another save; please try again in a moment."),
)
_DISK_PROBLEMS = {
    errno.ENOSPC: "The disk holding the image store is full, so nothing can be saved.",
    errno.EROFS: "The image store is read-only, so nothing can be saved.",
    errno.EACCES: "The image store cannot be written (permissions), so nothing can be saved.",
}
MISSING_PAYLOAD = (
    "The stored image of this study is missing or damaged (the image store may have been moved "
    "or lost). Upload the original file again to restore it."
)


def storage_problem(exc: BaseException) -> str | None:
    """A plain message for a storage failure (read-only or full database or image store, a
    missing or damaged payload); None for anything else. Never quotes SQL or paths."""
    if isinstance(exc, PayloadError):
        return MISSING_PAYLOAD
    if isinstance(exc, OSError) and exc.errno in _DISK_PROBLEMS:
        return _DISK_PROBLEMS[exc.errno]
    if isinstance(exc, OperationalError):
        text = str(exc.orig).lower()
        for words, message in _DATABASE_PROBLEMS:
            if words in text:
                return message
        return "The database could not be used, so nothing was saved. The server log has details."
    if isinstance(exc, SQLAlchemyError):
        return "The database could not be used, so nothing was saved. The server log has details."
    return None
