"""Persistence for InfMap: SQLAlchemy models, engine/session setup, migrations and the
repository of operations the app uses. Knows nothing of Streamlit.

Typical use::

    from database import init_db, session_scope, repository as repo

    engine = init_db()                      # DATABASE_URL or data/infmap.sqlite, migrated to head
    with session_scope(engine) as s:
        user = repo.get_or_create_user(s, "ann", "annotator")
"""

from database import repository
from database.repository import RoleError, StaleVersionError
from database.session import data_dir_for, init_db, make_engine, session_scope

__all__ = [
    "RoleError",
    "StaleVersionError",
    "data_dir_for",
    "init_db",
    "make_engine",
    "repository",
    "session_scope",
]
