"""Engine, SQLite settings, schema upgrades and the transaction helper.

The database is ``settings.database_url()`` (``DATABASE_URL`` or
``sqlite:///<repo>/data/infmap.sqlite``). Image payloads live in a file store next to the SQLite
file (``<data_dir>/images/<sha256>.npz``); ``INFMAP_DATA_DIR`` overrides where that is (needed for
non-SQLite URLs that have no file to sit next to).

SQLite transactions follow SQLAlchemy's documented recipe for the ``sqlite3`` driver ("Enabling
Non-Legacy SQLite Transactional Modes", the former "Serializable isolation / Savepoints /
Transactional DDL" section): the driver's own BEGIN handling is switched off on connect and a
``begin`` event emits ``BEGIN IMMEDIATE``. A write session therefore holds SQLite's write lock from
its first statement, so reading an annotation head and appending on top of it cannot interleave
with another writer; a second writer waits (``busy_timeout``) and then sees the new head.
Read-only sessions (``session_scope(engine, write=False)``) emit a plain deferred ``BEGIN`` and
never block writers (WAL).

PostgreSQL (``postgresql+psycopg://...``, psycopg 3) runs at READ COMMITTED, set explicitly: every
statement sees what committed before it started, so a writer that waited for a row lock
(``SELECT ... FOR UPDATE``) or for ``serialize_writers`` then reads the rows its predecessor
committed. (At REPEATABLE READ its snapshot would predate them and two saves could both pass the
head check.)
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session

import settings

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
BUSY_TIMEOUT_MS = 10_000
_BEGIN_OPTION = "infmap_sqlite_begin"  # execution option: "IMMEDIATE" (default) or "DEFERRED"


def _sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL, or None (other backends, in-memory)."""
    if url.get_backend_name() != "sqlite":
        return None
    db = url.database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db).expanduser().resolve()


def data_dir_for(bind: Engine | URL | str) -> Path:
    """The file-store root for a database: ``INFMAP_DATA_DIR``, else the SQLite file's folder."""
    override = settings.data_dir_override()
    if override is not None:
        return override
    url = bind.url if isinstance(bind, Engine) else make_url(bind)
    db_file = _sqlite_file(url)
    return db_file.parent if db_file is not None else settings.DEFAULT_DATA_DIR


def _use_wal(cursor: Any) -> None:
    """Put the file in WAL mode (it stays so: later connections find it set). Switching a new
    file does not wait on the busy timeout: app processes starting at once on a new file got
    "database is locked" here, so a locked switch is retried until the timeout."""
    import sqlite3

    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
            return
        try:
            cursor.execute("PRAGMA journal_mode = WAL")  # (an in-memory database says "memory")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 driver (SQLAlchemy's documented recipe):
        # it no longer emits BEGIN itself nor commits implicitly before DDL / SAVEPOINT.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            _use_wal(cursor)
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "IMMEDIATE")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if mode == "IMMEDIATE" else "BEGIN")


def make_engine(url: str | URL | None = None, **kwargs: Any) -> Engine:
    """An engine for ``url`` (default: ``settings.database_url()``) with the SQLite settings."""
    url = make_url(url or settings.database_url())
    db_file = _sqlite_file(url)
    if db_file is not None:
        db_file.parent.mkdir(parents=True, exist_ok=True)
    if url.get_backend_name() == "postgresql":
        kwargs.setdefault("isolation_level", "READ COMMITTED")  # see the module docstring
    engine = create_engine(url, **kwargs)
    if url.get_backend_name() == "sqlite":
        _install_sqlite_hooks(engine)
    return engine


def alembic_config(url: str | URL | None = None) -> Any:
    """The Alembic configuration, built in code (no alembic.ini needed)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    rendered = make_url(url or settings.database_url()).render_as_string(hide_password=False)
    cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run Alembic migrations up to ``revision`` in one transaction on ``engine``."""
    from alembic import command

    cfg = alembic_config(engine.url)
    with engine.begin() as connection:  # BEGIN IMMEDIATE on SQLite: concurrent starts serialise
        if connection.dialect.name == "postgresql":
            # Replicas starting at once on an empty database take turns here; without it their
            # CREATE TABLE alembic_version collided (a unique violation, or a hang).
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                               {"key": zlib.crc32(b"infmap:migrate")})
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


def init_db(url: str | URL | None = None, **kwargs: Any) -> Engine:
    """Open (creating if needed) the database and upgrade its schema to the newest revision."""
    engine = make_engine(url, **kwargs)
    upgrade(engine, "head")
    return engine


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def serialize_writers(session: Session, what: str) -> None:
    """Hold a lock named ``what`` until the session's transaction ends, so that writers of the
    same thing take turns. PostgreSQL: a transaction-level advisory lock. SQLite: nothing to do,
    a write session already holds the database's write lock (``BEGIN IMMEDIATE``)."""
    if session.get_bind().dialect.name == "postgresql":
        key = zlib.crc32(f"infmap:{what}".encode())  # a stable 32-bit key (fits the bigint)
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


@contextmanager
def session_scope(engine: Engine, *, write: bool = True) -> Iterator[Session]:
    """A session in one transaction: committed on success, rolled back on any exception.

    ``write=False`` starts a deferred (read) transaction on SQLite so it never waits for or
    blocks writers; writing in it may fail with "database is locked" under contention.
    Objects stay usable after the block (``expire_on_commit=False``).
    """
    bind = engine if write else engine.execution_options(**{_BEGIN_OPTION: "DEFERRED"})
    session = Session(bind=bind, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def integrity_check(engine: Engine) -> str:
    """SQLite's ``PRAGMA integrity_check`` ("ok" when the file is whole); "n/a" elsewhere."""
    if engine.dialect.name != "sqlite":
        return "n/a"
    with engine.connect() as conn:
        return str(conn.execute(text("PRAGMA integrity_check")).scalar())

