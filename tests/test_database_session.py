"""database.session on a real SQLite file in tmp_path and on a real PostgreSQL (conftest's
``engine``): the schema and its migrations, engine settings (WAL, BEGIN IMMEDIATE, READ
COMMITTED), the URL from the environment, and crash safety (a failed transaction writes
nothing)."""

from __future__ import annotations

from pathlib import Path

import pytest
from db_helpers import (
    add_image,
    box,
    count,
    model_version,
)
from sqlalchemy import Engine, inspect, text

import settings
from database import annotation_versions, images, users
from database.models import AnnotationVersion, Image, ModelVersion, User
from database.session import (
    current_revision,
    data_dir_for,
    init_db,
    make_engine,
    session_scope,
    upgrade,
)

# --------------------------------------------------------------------------- engine, migrations


def test_init_db_creates_schema(engine: Engine, db_path: Path) -> None:
    tables = set(inspect(engine).get_table_names())
    assert {
        "users",
        "images",
        "model_versions",
        "predictions",
        "annotation_versions",
        "finetune_runs",
        "alembic_version",
    } <= tables
    assert data_dir_for(engine) == db_path.parent


def test_postgresql_runs_read_committed(postgres_url: str) -> None:
    """Even on a server whose default is stricter: the row-lock reasoning of
    annotation_versions needs each statement to see what committed before it."""
    admin = make_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        name = conn.exec_driver_sql("SELECT current_database()").scalar()
        conn.exec_driver_sql(
            f'ALTER DATABASE "{name}" SET default_transaction_isolation = \'repeatable read\''
        )
    admin.dispose()
    engine = init_db(postgres_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW transaction_isolation").scalar() == "read committed"
    finally:
        engine.dispose()


def test_sqlite_file_in_wal_mode(sqlite_engine: Engine, db_path: Path) -> None:
    engine = sqlite_engine
    assert db_path.is_file()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    assert (db_path.parent / "infmap.sqlite-wal").exists()
    assert data_dir_for(engine) == db_path.parent


def test_migration_matches_models(engine: Engine) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from database.models import Base

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, Base.metadata) == []


@pytest.mark.timeout(120)  # before the fix PostgreSQL could also hang here
@pytest.mark.parametrize("round_", range(3))
def test_concurrent_first_starts_migrate_once(database_url: str, round_: int) -> None:
    """Several app processes starting at once on an empty database (a department's replicas,
    the two-server browser test): every one gets the schema at head and none fails. On
    PostgreSQL the second CREATE TABLE alembic_version used to fail with a unique violation."""
    import threading

    from alembic.script import ScriptDirectory

    from database.session import alembic_config

    starts = 4
    barrier = threading.Barrier(starts)
    errors: list[BaseException] = []
    engines: list[Engine] = []

    def start() -> None:
        engine = make_engine(database_url)
        engines.append(engine)
        barrier.wait()
        try:
            upgrade(engine, "head")
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(starts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
        assert {current_revision(e) for e in engines} == {head}
    finally:
        for e in engines:
            e.dispose()


def test_second_init_db_is_a_noop_that_keeps_data(database_url: str) -> None:
    url = database_url
    first = make_engine(url)
    upgrade(first, "0001")  # the oldest revision, as an older app version would have left it
    assert current_revision(first) == "0001"
    with session_scope(first) as s:
        users.get_or_create_user(s, "ann", "annotator")
    first.dispose()

    again = init_db(url)  # a newer app opening the older database: upgrade to head
    from alembic.script import ScriptDirectory

    from database.session import alembic_config

    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    assert current_revision(again) == head
    with again.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM alembic_version").scalar() == 1
    assert count(again, User) == 1
    again.dispose()


def test_database_url_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert settings.database_url().endswith("data/infmap.sqlite")
    url = f"sqlite:///{tmp_path / 'env' / 'x.sqlite'}"
    monkeypatch.setenv("DATABASE_URL", url)
    eng = init_db()
    try:
        assert (tmp_path / "env" / "x.sqlite").is_file()
    finally:
        eng.dispose()


def test_writes_begin_immediate_reads_deferred(sqlite_engine: Engine) -> None:
    engine = sqlite_engine
    seen: list[str] = []

    from sqlalchemy import event

    def capture(conn, cursor, statement, *args) -> None:
        if statement.startswith("BEGIN"):
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with session_scope(engine) as s:
            s.execute(text("SELECT 1"))
        with session_scope(engine, write=False) as s:
            s.execute(text("SELECT 1"))
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert seen == ["BEGIN IMMEDIATE", "BEGIN"]


# --------------------------------------------------------------------------- crash safety


def test_exception_inside_session_scope_writes_nothing(engine: Engine, db_path: Path) -> None:
    with session_scope(engine) as s:
        ann = users.get_or_create_user(s, "ann", "annotator")
        image = add_image(s)
        head = annotation_versions.save_annotation(
            s, image.id, "lung", box(0, 0, 5, 5), ann, "draft", None
        )
    before = {m: count(engine, m) for m in (User, Image, AnnotationVersion, ModelVersion)}

    with pytest.raises(KeyboardInterrupt), session_scope(engine) as s:  # a crash mid-save
        users.get_or_create_user(s, "bob", "annotator")
        new_image = add_image(s, seed=7)
        model_version(s, "v9")
        annotation_versions.save_annotation(
            s, image.id, "lung", box(0, 0, 9, 9), ann, "submitted", head.id
        )
        annotation_versions.save_annotation(
            s, new_image.id, "lung", box(0, 0, 9, 9), ann, "draft", None
        )
        raise KeyboardInterrupt

    assert {m: count(engine, m) for m in before} == before
    with session_scope(engine, write=False) as s:
        assert annotation_versions.head_version(s, image.id, "lung").id == head.id
        assert users.get_user(s, "bob") is None
    # The payload file written before the crash is content-addressed: re-adding reuses it.
    with session_scope(engine) as s:
        again = add_image(s, seed=7)
        assert images.read_image_payload(again) == b"payload-7" * 10
