"""Persistence for InfMap: SQLAlchemy models, engine/session setup, migrations and one module
of operations per aggregate. Storage only: knows nothing of Streamlit, inference or services.

- ``database.session``         engine, SQLite settings, migrations, ``session_scope``
- ``database.models``          the tables
- ``database.masks``           binary masks <-> PNG bytes
- ``database.users``           accounts (argon2id hashes), roles, ``python -m database.users``
- ``database.audit``           the append-only audit trail
- ``database.images``          studies and their file store (de-identified payloads)
- ``database.model_versions``  registered checkpoints, the active one, lineage
- ``database.predictions``     the model's output per (image, model version)
- ``database.annotation_versions`` append-only human masks, concurrency, review, training set
- ``database.reading_versions`` the readings (label + finding), versioned the same way
- ``database.versioning``      what those two share: heads, stale refusals, review roles
- ``database.worklist``        the worklist and the next study to look at
- ``database.runs``            fine-tuning runs

Every operation takes a Session and never commits: the caller owns the transaction::

    from database import init_db, session_scope, users

    engine = init_db()                      # DATABASE_URL or data/infmap.sqlite, migrated to head
    with session_scope(engine) as s:
        user = users.get_or_create_user(s, "ann", "annotator")
"""

from database.session import data_dir_for, init_db, make_engine, session_scope
from database.versioning import RoleError, StaleVersionError

__all__ = [
    "RoleError",
    "StaleVersionError",
    "data_dir_for",
    "init_db",
    "make_engine",
    "session_scope",
]
