"""Alembic environment. Configuration is built in code by ``database.session.alembic_config``.

``init_db`` passes an open connection (``config.attributes["connection"]``) inside its own
transaction; run from the alembic CLI (``alembic -c database/alembic.ini ...``) an engine with the
project's SQLite settings is made from ``sqlalchemy.url`` / ``DATABASE_URL``.
"""

from __future__ import annotations

from typing import Any

from alembic import context

import settings
from database.models import Base
from database.session import make_engine

config = context.config
target_metadata = Base.metadata


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite ALTER TABLE support for later revisions
        compare_type=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    _configure(
        url=config.get_main_option("sqlalchemy.url") or settings.database_url(),
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection, transactional_ddl=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url") or settings.database_url())
    try:
        with engine.connect() as conn:
            _configure(connection=conn, transactional_ddl=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
