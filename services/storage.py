"""The app's database as the services and pages see it: one engine per database URL and the
session factory (``scope``) every service takes, so pages never touch sessions or SQL."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine

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
