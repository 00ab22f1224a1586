"""Database aggregates on a real SQLite file in tmp_path and on a real PostgreSQL (conftest's
``engine``): images and their file store, predictions, model versions (concurrent activation
included), fine-tuning runs, mask PNGs. Engine, migrations and crash safety:
test_database_session."""

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
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError

from database import images, model_versions, predictions, runs
from database.masks import mask_to_png, png_to_mask
from database.models import Image, Prediction
from database.session import (
    data_dir_for,
    make_engine,
    session_scope,
)

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


def test_run_heartbeat_host_and_stop_request(engine: Engine) -> None:
    """What lets an app server on another machine judge and stop a run: where it runs, when it
    last beat, and a stop request the run reads itself."""
    with session_scope(engine) as s:
        run_id = runs.create_run(s).id
        assert runs.get_run(s, run_id).stop_requested is False  # the server default too
    with session_scope(engine) as s:
        r = runs.update_run_progress(s, run_id, 0.1, "starting", pid=4321, host="trainer-1")
        first = r.heartbeat
        assert r.host == "trainer-1" and first is not None and first.tzinfo is not None
    with session_scope(engine) as s:
        assert runs.beat(s, run_id) is False
        assert runs.get_run(s, run_id).heartbeat >= first
        runs.request_stop(s, run_id)
    with session_scope(engine) as s:
        assert runs.beat(s, run_id) is True
        assert runs.get_run(s, run_id).host == "trainer-1"  # a progress update keeps the host
        runs.finish_run(s, run_id, "interrupted", "stop requested")
    with session_scope(engine) as s:
        with pytest.raises(ValueError):
            runs.beat(s, run_id)
        done = runs.request_stop(s, run_id)  # asking a finished run changes nothing
        assert done.status == "interrupted"


def test_mask_png_round_trip() -> None:
    mask = box(3, 4, 20, 50)
    data = mask_to_png(mask)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(png_to_mask(data), mask)
    np.testing.assert_array_equal(png_to_mask(mask_to_png(mask.astype(np.uint8))), mask)
