"""Database layer on a real SQLite file in tmp_path and on a real PostgreSQL (conftest's
``engine``): engine and migrations, images and their file store, predictions, model versions
(concurrent activation included), crash safety, fine-tuning runs."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from db_helpers import (
    FakePrediction,
    H,
    W,
    add_image,
    box,
    count,
    model_version,
)
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import IntegrityError

import settings
from database import annotation_versions, images, model_versions, predictions, runs, users
from database.masks import mask_to_png, png_to_mask
from database.models import AnnotationVersion, Image, ModelVersion, Prediction, User
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


# --------------------------------------------------------------------------- images


def test_add_image_dedupes_by_hash_and_stores_payload(
    engine: Engine, database_url: str, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = b"npz-bytes" * 100
    sha = hashlib.sha256(b"the original file").hexdigest()
    with session_scope(engine) as s:
        image, created = images.add_image(
            s, payload, sha, "a.png", {"format": "PNG"}, W, H, "upload"
        )
        assert created
    with session_scope(engine) as s:
        again, created = images.add_image(s, payload, sha, "copy.png", {}, W, H, "upload")
        assert not created and again.id == image.id and again.display_name == "a.png"
    assert count(engine, Image) == 1

    assert image.payload_path == f"images/{sha}.npz"  # relative in the database
    stored = db_path.parent / "images" / f"{sha}.npz"
    assert stored.read_bytes() == payload
    assert not list(stored.parent.glob("*.tmp"))
    # Detached (its session has closed): the file store is named, or found through settings.
    assert images.read_image_payload(image, data_dir_for(engine)) == payload
    monkeypatch.setenv("DATABASE_URL", database_url)
    assert images.read_image_payload(image) == payload
    with session_scope(engine, write=False) as s:
        assert images.read_image_payload(images.get_image(s, image.id)) == payload

    stored.write_bytes(b"tampered")
    with pytest.raises(images.PayloadError):
        images.read_image_payload(image)

    with session_scope(engine) as s, pytest.raises(ValueError):
        images.add_image(s, payload, "not-a-hash", "b.png", {}, W, H, "upload")


# --------------------------------------------------------------------------- predictions


def test_prediction_is_stored_once_per_model_version(engine: Engine) -> None:
    with session_scope(engine) as s:
        image = add_image(s)
        v1 = model_version(s, "v1")
        v2 = model_version(s, "v2", activate=False)
        first = predictions.store_prediction(s, image.id, v1.id, FakePrediction())
    with session_scope(engine) as s:
        other = FakePrediction(predicted_class="Normal", infection_percent=0.0)
        again = predictions.store_prediction(s, image.id, v1.id, other)
        assert again.id == first.id and again.predicted_class == "COVID-19"
        second = predictions.store_prediction(
            s, image.id, v2.id, FakePrediction(model_version="v2")
        )
        assert second.id != first.id
    assert count(engine, Prediction) == 2

    with session_scope(engine, write=False) as s:
        row = predictions.get_prediction(s, image.id, v1.id)
        lung, infection = predictions.prediction_masks(row)
        assert row.confidence == pytest.approx(0.7)
        assert list(row.probabilities) == ["COVID-19", "Non-COVID", "Normal"]
        assert row.timings == {"model": 12.0}
    np.testing.assert_array_equal(lung, FakePrediction().lung_mask)
    np.testing.assert_array_equal(infection, FakePrediction().infection_mask)

    with session_scope(engine) as s:
        v3 = model_version(s, "v3", activate=False)
        with pytest.raises(ValueError, match="made by model"):
            predictions.store_prediction(s, image.id, v3.id, FakePrediction(model_version="v1"))
        wrong = FakePrediction(model_version="v3", lung_mask=np.zeros((10, 10), bool))
        with pytest.raises(ValueError, match="shape"):
            predictions.store_prediction(s, image.id, v3.id, wrong)
    with engine.connect() as conn, pytest.raises(IntegrityError):  # the database's own guard
        columns = (
            "image_id, model_version_id, probabilities, predicted_class, confidence,"
            " lung_mask_png, infection_mask_png, infection_percent, infection_percent_left,"
            " infection_percent_right, severity, severity_score, uncertainty, timings, created"
        )
        conn.execute(
            text(f"INSERT INTO predictions ({columns}) SELECT {columns} FROM predictions"
                 " WHERE id = :i"),
            {"i": first.id},
        )


def test_real_prediction_dataclass_is_storable(engine: Engine) -> None:
    from inference import predict

    fake = FakePrediction()
    real = predict.Prediction(
        class_names=fake.class_names,
        probabilities=fake.probabilities,
        predicted_class=fake.predicted_class,
        lung_mask=fake.lung_mask,
        infection_mask=fake.infection_mask,
        lung_probability=fake.lung_mask.astype(np.float32),
        infection_probability=fake.infection_mask.astype(np.float32),
        infection_percent=fake.infection_percent,
        infection_percent_left=fake.infection_percent_left,
        infection_percent_right=fake.infection_percent_right,
        severity=fake.severity,
        severity_score=fake.severity_score,
        gradcam=np.zeros((H, W), np.float32),
        gradcam_class="COVID-19",
        model_version="v1",
        uncertainty=fake.uncertainty,
        timings_ms=fake.timings_ms,
    )
    with session_scope(engine) as s:
        row = predictions.store_prediction(s, add_image(s).id, model_version(s).id, real)
        assert row.severity_score == fake.severity_score


# --------------------------------------------------------------------------- model versions


def test_model_version_activation_and_rollback_keep_exactly_one_active(engine: Engine) -> None:
    def active_versions() -> list[str]:
        with session_scope(engine, write=False) as s:
            return [m.version for m in model_versions.list_model_versions(s) if m.active]

    with session_scope(engine) as s:
        v1 = model_versions.register_model_version(s, "v1", "/m/v1.pt", "a" * 64, {"dice": 0.7})
    assert active_versions() == ["v1"]  # the first registered becomes active
    with session_scope(engine) as s:
        v2 = model_versions.register_model_version(
            s,
            "v2",
            "/m/v2.pt",
            "b" * 64,
            {"dice": 0.8},
            parent=v1,
            lineage={"annotation_version_ids": [1, 2], "data_hash": "c" * 64},
            train_minutes=3.5,
        )
    assert active_versions() == ["v1"]  # a candidate is not activated unless asked
    with session_scope(engine) as s:
        model_versions.set_active_model_version(s, v2.id)
        assert model_versions.get_active_model_version(s).version == "v2"
    assert active_versions() == ["v2"]
    with session_scope(engine) as s:
        model_versions.set_active_model_version(s, v1.id)  # roll back
    assert active_versions() == ["v1"]
    with session_scope(engine) as s:
        v3 = model_versions.register_model_version(s, "v3", "/m/v3.pt", "d" * 64, activate=True)
        assert v3.active
        assert model_versions.register_model_version(s, "v3", "/m/v3.pt", "d" * 64).id == v3.id
        with pytest.raises(ValueError):
            model_versions.register_model_version(s, "v3", "/m/other.pt", "e" * 64)
        with pytest.raises(LookupError):
            model_versions.set_active_model_version(s, 999)
    assert active_versions() == ["v3"]
    with session_scope(engine, write=False) as s:
        assert [m.version for m in model_versions.list_model_versions(s)] == ["v3", "v2", "v1"]
        got = model_versions.get_model_version(s, "v2")
        assert got.parent_id == v1.id and got.lineage["annotation_version_ids"] == [1, 2]
    with engine.begin() as conn, pytest.raises(IntegrityError):  # the one-active index
        conn.execute(text("UPDATE model_versions SET active = TRUE"))


def test_concurrent_activations_leave_exactly_one_active(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replicas register and activate a new version each at the same moment (one engine,
    so one connection, per writer): both are registered, one is active, neither fails."""
    with session_scope(engine) as s:
        model_version(s, "v1")
    real_set_active = model_versions.set_active_model_version

    def slow_set_active(*args, **kwargs):  # hold the transaction open after activating
        row = real_set_active(*args, **kwargs)
        time.sleep(0.3)
        return row

    monkeypatch.setattr(model_versions, "set_active_model_version", slow_set_active)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def register(version: str) -> None:
        eng = make_engine(engine.url)
        try:
            barrier.wait()
            with session_scope(eng) as s:
                model_version(s, version, activate=True)
        except Exception as exc:  # collected for the assertion below
            errors.append(exc)
        finally:
            eng.dispose()

    threads = [threading.Thread(target=register, args=(v,)) for v in ("v2", "v3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    with session_scope(engine, write=False) as s:
        listed = model_versions.list_model_versions(s)
        assert sorted(m.version for m in listed) == ["v1", "v2", "v3"]
        assert [m.version for m in listed if m.active] in (["v2"], ["v3"])


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


# --------------------------------------------------------------------------- fine-tune runs


def test_finetune_run_lifecycle(engine: Engine) -> None:
    with session_scope(engine) as s:
        run = runs.create_run(s, {"epochs": 2})
        assert run.status == "queued" and run.progress == 0
    with session_scope(engine) as s:
        r = runs.update_run_progress(s, run.id, 0.4, "epoch 1/2", pid=1234)
        assert r.status == "running" and r.started is not None and r.pid == 1234
        r = runs.update_run_progress(s, run.id, 7.0)
        assert r.progress == 1.0 and r.message == "epoch 1/2"
        mv = model_version(s, "ft-1", activate=False)
        runs.finish_run(s, run.id, "succeeded", "done", model_version_id=mv.id)
    with session_scope(engine) as s:
        with pytest.raises(ValueError):
            runs.update_run_progress(s, run.id, 0.5)
        other = runs.create_run(s)
        runs.finish_run(s, other.id, "interrupted", "server restarted")
    with session_scope(engine, write=False) as s:
        listed = runs.list_runs(s)
        assert [x.id for x in listed] == [other.id, run.id]
        done = runs.get_run(s, run.id)
        assert done.status == "succeeded" and done.finished >= done.started
        assert done.model_version.version == "ft-1"


def test_mask_png_round_trip() -> None:
    mask = box(3, 4, 20, 50)
    data = mask_to_png(mask)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(png_to_mask(data), mask)
    np.testing.assert_array_equal(png_to_mask(mask_to_png(mask.astype(np.uint8))), mask)
