"""Database layer against a real SQLite file in tmp_path (WAL, migrations, concurrency)."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.exc import IntegrityError

import settings
from database import annotation_versions, images, model_versions, predictions, runs, users, worklist
from database.annotation_versions import RoleError, StaleVersionError
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

H, W = 48, 64


# --------------------------------------------------------------------------- helpers


@dataclass
class FakePrediction:
    """Stand-in with the attributes of inference.predict.Prediction that the database stores."""

    predicted_class: str = "COVID-19"
    probabilities: dict[str, float] = field(
        default_factory=lambda: {"COVID-19": 0.7, "Non-COVID": 0.2, "Normal": 0.1}
    )
    class_names: list[str] = field(default_factory=lambda: ["COVID-19", "Non-COVID", "Normal"])
    lung_mask: np.ndarray = field(default_factory=lambda: _box(5, 5, 40, 60))
    infection_mask: np.ndarray = field(default_factory=lambda: _box(10, 10, 20, 30))
    infection_percent: float = 12.5
    infection_percent_left: float = 10.0
    infection_percent_right: float = 15.0
    severity: str = "mild"
    severity_score: int = 2
    model_version: str = "v1"
    uncertainty: float = 0.3
    timings_ms: dict[str, float] = field(default_factory=lambda: {"model": 12.0})


def _box(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "db" / "infmap.sqlite"


@pytest.fixture
def engine(db_path: Path) -> Engine:
    eng = init_db(f"sqlite:///{db_path}")
    yield eng
    eng.dispose()


def add_image(s, seed: int = 0, name: str = "patient.png") -> Image:
    payload = f"payload-{seed}".encode() * 10
    sha = hashlib.sha256(f"original-{seed}".encode()).hexdigest()
    image, _ = images.add_image(s, payload, sha, name, {"format": "PNG"}, W, H, "upload")
    return image


def model_version(s, version: str = "v1", activate: bool = True) -> ModelVersion:
    return model_versions.register_model_version(
        s,
        version,
        f"/models/{version}.pt",
        hashlib.sha256(version.encode()).hexdigest(),
        {"dice": 0.8},
        activate=activate,
    )


def save_or_keep_draft(
    engine: Engine,
    image_id: int,
    kind: str,
    mask: np.ndarray,
    author: User,
    status: str,
    base_id: int | None,
) -> StaleVersionError:
    """The caller's side of a refused save (as ``services.studies.save_mask`` does it): the
    refusal rolls back, and the mask is kept as a conflict draft in a transaction of its own."""
    try:
        with session_scope(engine) as s:
            annotation_versions.save_annotation(s, image_id, kind, mask, author, status, base_id)
    except StaleVersionError as exc:
        with session_scope(engine) as s:
            draft = annotation_versions.save_conflict_draft(
                s, image_id, kind, mask, author, base_id
            )
            return exc.kept_as(draft.id)
    raise AssertionError("the save was not refused")


def count(engine: Engine, model: type) -> int:
    with session_scope(engine, write=False) as s:
        return s.scalar(select(func.count()).select_from(model))


# --------------------------------------------------------------------------- engine, migrations


def test_init_db_creates_schema_in_wal_mode(engine: Engine, db_path: Path) -> None:
    assert db_path.is_file()
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


def test_second_init_db_is_a_noop_that_keeps_data(db_path: Path) -> None:
    url = f"sqlite:///{db_path}"
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


def test_writes_begin_immediate_reads_deferred(engine: Engine) -> None:
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
    engine: Engine, db_path: Path, monkeypatch: pytest.MonkeyPatch
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
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{db_path}")
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
        conn.execute(
            text(
                "INSERT INTO predictions SELECT NULL, image_id, model_version_id, probabilities,"
                " predicted_class, confidence, lung_mask_png, infection_mask_png,"
                " infection_percent, infection_percent_left, infection_percent_right, severity,"
                " severity_score, uncertainty, timings, created FROM predictions WHERE id = :i"
            ),
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


# --------------------------------------------------------------------------- annotation versions


def test_save_chain_is_append_only_and_leaves_prediction_untouched(engine: Engine) -> None:
    with session_scope(engine) as s:
        image = add_image(s)
        pred = predictions.store_prediction(s, image.id, model_version(s).id, FakePrediction())
        ann = users.get_or_create_user(s, "ann", "annotator")
    model_lung_png = pred.lung_mask_png

    with session_scope(engine) as s:
        v1 = annotation_versions.save_annotation(
            s, image.id, "lung", _box(0, 0, 30, 30), ann, "draft", None, prediction_id=pred.id
        )
    with session_scope(engine) as s:
        v2 = annotation_versions.save_annotation(
            s, image.id, "lung", _box(0, 0, 40, 40), ann, "submitted", v1.id
        )
        v3 = annotation_versions.save_annotation(
            s, image.id, "lung", _box(0, 0, 45, 45), ann, "draft", v2.id
        )
    with session_scope(engine, write=False) as s:
        versions = annotation_versions.list_versions(s, image.id, "lung")
        assert [v.id for v in versions] == [v1.id, v2.id, v3.id]
        assert [v.parent_id for v in versions] == [None, v1.id, v2.id]
        assert versions[0].prediction_id == pred.id
        assert [v.status for v in versions] == ["draft", "submitted", "draft"]
        np.testing.assert_array_equal(
            annotation_versions.version_mask(versions[0]), _box(0, 0, 30, 30)
        )
        assert annotation_versions.head_version(s, image.id, "lung").id == v3.id
        assert annotation_versions.head_version(s, image.id, "infection") is None
        assert predictions.get_prediction(s, image.id, pred.model_version_id).lung_mask_png == (
            model_lung_png
        )

    with pytest.raises(RuntimeError, match="append-only"), session_scope(engine) as s:
        annotation_versions.get_version(s, v1.id).status = "approved"
    with pytest.raises(RuntimeError, match="append-only"), session_scope(engine) as s:
        s.delete(annotation_versions.get_version(s, v1.id))
    with session_scope(engine, write=False) as s:
        assert annotation_versions.get_version(s, v1.id).status == "draft"
    assert count(engine, AnnotationVersion) == 3

    with session_scope(engine) as s, pytest.raises(ValueError, match="shape"):
        annotation_versions.save_annotation(
            s, image.id, "lung", np.zeros((5, 5), bool), ann, "draft", v3.id
        )


def test_stale_save_is_refused_and_kept_as_conflict_draft(engine: Engine) -> None:
    with session_scope(engine) as s:
        image = add_image(s)
        ann = users.get_or_create_user(s, "ann", "annotator")
        bob = users.get_or_create_user(s, "bob", "annotator")
    ann_mask, bob_mask = _box(0, 0, 20, 20), _box(10, 10, 40, 50)

    # Both opened the editor when there was no human version yet (base None).
    with session_scope(engine) as s:
        first = annotation_versions.save_annotation(
            s, image.id, "infection", ann_mask, ann, "submitted", None
        )
    # The refusal writes nothing and commits nothing of the caller's transaction.
    with pytest.raises(StaleVersionError) as caught, session_scope(engine) as s:
        users.get_or_create_user(s, "carol", "annotator")  # the caller's other pending work
        annotation_versions.save_annotation(
            s, image.id, "infection", bob_mask, bob, "submitted", None
        )
    assert caught.value.conflict_version_id is None
    with session_scope(engine, write=False) as s:
        assert users.get_user(s, "carol") is None
        assert annotation_versions.drafts_for(s, bob, image.id) == []

    err = save_or_keep_draft(engine, image.id, "infection", bob_mask, bob, "submitted", None)
    assert err.head_author == "ann" and err.head_id == first.id and err.head_status == "submitted"
    assert "ann" in str(err) and "submitted" in str(err) and "UTC" in str(err)
    assert f"kept as draft version {err.conflict_version_id}" in str(err)
    assert err.head_created == first.created

    with session_scope(engine, write=False) as s:
        drafts = annotation_versions.drafts_for(s, bob, image.id)
        assert [d.id for d in drafts] == [err.conflict_version_id]
        draft = drafts[0]
        assert draft.conflict and draft.status == "draft" and draft.parent_id is None
        assert draft.author.name == "bob"
        np.testing.assert_array_equal(annotation_versions.version_mask(draft), bob_mask)
        assert (
            annotation_versions.head_version(s, image.id, "infection").id == first.id
        )  # still ann's

    # Bob now bases on the head; a conflict draft never becomes the head.
    with session_scope(engine) as s:
        ok = annotation_versions.save_annotation(
            s, image.id, "infection", bob_mask, bob, "submitted", first.id
        )
        assert ok.parent_id == first.id
    err = save_or_keep_draft(engine, image.id, "infection", ann_mask, ann, "draft", first.id)
    assert err.head_author == "bob"
    with session_scope(engine, write=False) as s:
        assert (
            annotation_versions.drafts_for(s, ann, image.id, conflict_only=True)[0].parent_id
            == first.id
        )


def test_concurrent_saves_on_the_same_head(
    db_path: Path, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two writers, each with its own engine, both based on the same head, saving at once."""
    with session_scope(engine) as s:
        image = add_image(s)
        people = [users.get_or_create_user(s, n, "annotator") for n in ("ann", "bob")]
        base = annotation_versions.save_annotation(
            s, image.id, "lung", _box(0, 0, 9, 9), people[0], "draft", None
        )

    real_head = annotation_versions.head_version

    def slow_head(*args, **kwargs):  # widen the read-check-write window
        found = real_head(*args, **kwargs)
        time.sleep(0.3)
        return found

    monkeypatch.setattr(annotation_versions, "head_version", slow_head)
    barrier = threading.Barrier(2)
    results: dict[str, object] = {}

    def save(user: User, mask: np.ndarray) -> None:
        eng = make_engine(f"sqlite:///{db_path}")
        try:
            barrier.wait()
            with session_scope(eng) as s:
                results[user.name] = annotation_versions.save_annotation(
                    s, image.id, "lung", mask, user, "submitted", base.id
                ).id
        except StaleVersionError as exc:
            with session_scope(eng) as s:
                draft = annotation_versions.save_conflict_draft(
                    s, image.id, "lung", mask, user, base.id
                )
                results[user.name] = exc.kept_as(draft.id)
        except Exception as exc:  # collected for the assertions below
            results[user.name] = exc
        finally:
            eng.dispose()

    threads = [
        threading.Thread(target=save, args=(u, _box(0, 0, 20 + 10 * i, 20)))
        for i, u in enumerate(people)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    winners = {n: r for n, r in results.items() if isinstance(r, int)}
    losers = {n: r for n, r in results.items() if isinstance(r, StaleVersionError)}
    assert len(winners) == 1 and len(losers) == 1, results
    (winner, win_id), (loser, err) = next(iter(winners.items())), next(iter(losers.items()))
    assert err.head_author == winner and err.head_id == win_id
    with session_scope(engine, write=False) as s:
        assert annotation_versions.head_version(s, image.id, "lung").id == win_id
        kept = annotation_versions.get_version(s, err.conflict_version_id)
        assert kept.conflict and kept.author.name == loser and kept.parent_id == base.id


def test_approve_and_send_back_require_a_radiologist(engine: Engine) -> None:
    with session_scope(engine) as s:
        image = add_image(s)
        ann = users.get_or_create_user(s, "ann", "annotator")
        rad = users.get_or_create_user(s, "dr-rad", "radiologist")
        sub = annotation_versions.save_annotation(
            s, image.id, "lung", _box(2, 2, 30, 30), ann, "submitted", None
        )

    with session_scope(engine) as s:
        with pytest.raises(RoleError):
            annotation_versions.approve_annotation(s, image.id, "lung", ann, sub.id)
        with pytest.raises(RoleError):
            annotation_versions.save_annotation(
                s, image.id, "lung", _box(0, 0, 5, 5), ann, "approved", sub.id
            )
        with pytest.raises(RoleError):
            annotation_versions.return_annotation(s, image.id, "lung", ann, sub.id, "no")
    with session_scope(engine) as s:
        back = annotation_versions.return_annotation(
            s, image.id, "lung", rad, sub.id, "left base missing"
        )
        assert back.status == "returned" and back.parent_id == sub.id
        assert back.comment == "left base missing" and back.mask_png == sub.mask_png
    with pytest.raises(StaleVersionError) as caught, session_scope(engine) as s:
        annotation_versions.approve_annotation(
            s, image.id, "lung", rad, sub.id
        )  # no longer the head
    assert caught.value.conflict_version_id is None and caught.value.head_author == "dr-rad"
    with session_scope(engine) as s:
        fixed = annotation_versions.save_annotation(
            s, image.id, "lung", _box(2, 2, 40, 40), ann, "submitted", back.id
        )
        ok = annotation_versions.approve_annotation(s, image.id, "lung", rad, fixed.id, "good")
        assert ok.status == "approved" and ok.author.role == "radiologist"
        np.testing.assert_array_equal(annotation_versions.version_mask(ok), _box(2, 2, 40, 40))
    with session_scope(engine) as s, pytest.raises(ValueError):
        users.get_or_create_user(s, "ann", "radiologist")  # roles are not silently changed


# --------------------------------------------------------------------------- worklist


def test_worklist_statuses_filters_and_sorting(engine: Engine) -> None:
    with session_scope(engine) as s:
        v1 = model_version(s, "v1")
        ann = users.get_or_create_user(s, "ann", "annotator")
        bob = users.get_or_create_user(s, "bob", "annotator")
        rad = users.get_or_create_user(s, "rad", "radiologist")
        ids = []
        specs = [  # (class, uncertainty, infection %)
            ("COVID-19", 0.50, 30.0),
            ("Normal", 0.10, 0.0),
            ("COVID-19", 0.90, 5.0),
            ("Non-COVID", 0.30, 60.0),
            ("COVID-19", 0.70, 10.0),
            ("Normal", 0.20, 1.0),
        ]
        for i, (cls, unc, inf) in enumerate(specs):
            image = add_image(s, seed=i, name=f"img{i}.png")
            ids.append(image.id)
            predictions.store_prediction(
                s,
                image.id,
                v1.id,
                FakePrediction(
                    predicted_class=cls,
                    uncertainty=unc,
                    infection_percent=inf,
                ),
            )
        m = _box(0, 0, 10, 10)
        # ids[0] new. ids[1] corrected (a draft). ids[2] submitted (lung) after an infection draft.
        annotation_versions.save_annotation(s, ids[1], "lung", m, ann, "draft", None)
        annotation_versions.save_annotation(s, ids[2], "infection", m, ann, "draft", None)
        sub = annotation_versions.save_annotation(s, ids[2], "lung", m, bob, "submitted", None)
        a = annotation_versions.save_annotation(s, ids[3], "lung", m, ann, "submitted", None)
        annotation_versions.approve_annotation(s, ids[3], "lung", rad, a.id)
        r = annotation_versions.save_annotation(s, ids[4], "infection", m, ann, "submitted", None)
        annotation_versions.return_annotation(s, ids[4], "infection", rad, r.id, "redo")
    save_or_keep_draft(engine, ids[2], "lung", m, ann, "draft", None)  # conflict: no effect

    with session_scope(engine, write=False) as s:
        rows = {r.image_id: r for r in worklist.worklist(s)}
        assert [rows[i].status for i in ids] == [
            "new",
            "corrected",
            "submitted",
            "approved",
            "returned",
            "new",
        ]
        assert rows[ids[2]].last_author == "bob" and rows[ids[2]].last_touched == sub.created
        assert rows[ids[0]].last_author is None and rows[ids[0]].last_touched is None
        assert rows[ids[3]].last_author == "rad"
        assert rows[ids[0]].predicted_class == "COVID-19" and rows[ids[0]].confidence == 0.7

        by_unc = [r.image_id for r in worklist.worklist(s, sort="uncertainty")]
        assert by_unc == [ids[2], ids[4], ids[0], ids[3], ids[5], ids[1]]
        by_inf = [r.image_id for r in worklist.worklist(s, sort="infection")]
        assert by_inf == [ids[3], ids[0], ids[4], ids[2], ids[5], ids[1]]
        assert [r.image_id for r in worklist.worklist(s, sort="created")] == ids[::-1]
        assert [r.image_id for r in worklist.worklist(s, sort="oldest")] == ids
        assert [r.image_id for r in worklist.worklist(s, status="new")] == [ids[5], ids[0]]
        covid = worklist.worklist(s, predicted_class="COVID-19", status=["new", "returned"])
        assert {r.image_id for r in covid} == {ids[0], ids[4]}

        assert worklist.next_to_review(s).image_id == ids[0]  # oldest new
        assert worklist.next_to_review(s, by="uncertainty").image_id == ids[0]  # 0.5 > 0.2
        assert worklist.next_to_review(s, exclude=[ids[0]]).image_id == ids[5]
        assert worklist.next_to_review(s, status="submitted").image_id == ids[2]
        with pytest.raises(ValueError):
            worklist.worklist(s, sort="bogus")

    with session_scope(engine) as s:  # another model version: no predictions yet
        v2 = model_version(s, "v2", activate=True)
        rows = worklist.worklist(s)
        assert all(r.predicted_class is None for r in rows)
        assert len(worklist.worklist(s, model_version_id=v1.id, predicted_class="Normal")) == 2
        assert v2.active


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
        conn.execute(text("UPDATE model_versions SET active = 1"))


# --------------------------------------------------------------------------- training data


def test_training_annotations_latest_submitted_or_approved(engine: Engine) -> None:
    with session_scope(engine) as s:
        ann = users.get_or_create_user(s, "ann", "annotator")
        rad = users.get_or_create_user(s, "rad", "radiologist")
        im = [add_image(s, seed=i).id for i in range(4)]
        m = _box(0, 0, 10, 10)
        # im0 lung: submitted, approved, then a newer draft -> the approved one counts.
        a = annotation_versions.save_annotation(s, im[0], "lung", m, ann, "submitted", None)
        a2 = annotation_versions.approve_annotation(s, im[0], "lung", rad, a.id)
        annotation_versions.save_annotation(s, im[0], "lung", m, ann, "draft", a2.id)
        # im0 infection: submitted twice -> the newer.
        b = annotation_versions.save_annotation(s, im[0], "infection", m, ann, "submitted", None)
        b2 = annotation_versions.save_annotation(s, im[0], "infection", m, ann, "submitted", b.id)
        # im1 lung: submitted then returned -> nothing; im1 infection: draft only -> nothing.
        c = annotation_versions.save_annotation(s, im[1], "lung", m, ann, "submitted", None)
        c2 = annotation_versions.return_annotation(s, im[1], "lung", rad, c.id, "wrong")
        annotation_versions.save_annotation(s, im[1], "infection", m, ann, "draft", None)
        # im2 lung: returned then resubmitted -> the resubmission.
        d = annotation_versions.save_annotation(s, im[2], "lung", m, ann, "submitted", None)
        d2 = annotation_versions.return_annotation(s, im[2], "lung", rad, d.id, "redo")
        d3 = annotation_versions.save_annotation(s, im[2], "lung", m, ann, "submitted", d2.id)
    # im3: a conflict draft only -> nothing.
    with session_scope(engine) as s:
        e = annotation_versions.save_annotation(s, im[3], "lung", m, ann, "submitted", None)
    save_or_keep_draft(engine, im[3], "lung", m, ann, "submitted", None)

    with session_scope(engine, write=False) as s:
        got = [(v.image_id, v.kind, v.id) for v in annotation_versions.training_annotations(s)]
        assert got == [
            (im[0], "infection", b2.id),
            (im[0], "lung", a2.id),
            (im[2], "lung", d3.id),
            (im[3], "lung", e.id),
        ]
        approved = [
            v.id for v in annotation_versions.training_annotations(s, statuses=("approved",))
        ]
        assert approved == [a2.id]
        assert c2.id not in [
            v.id for v in annotation_versions.training_annotations(s, statuses=("submitted",))
        ]


# --------------------------------------------------------------------------- crash safety


def test_exception_inside_session_scope_writes_nothing(engine: Engine, db_path: Path) -> None:
    with session_scope(engine) as s:
        ann = users.get_or_create_user(s, "ann", "annotator")
        image = add_image(s)
        head = annotation_versions.save_annotation(
            s, image.id, "lung", _box(0, 0, 5, 5), ann, "draft", None
        )
    before = {m: count(engine, m) for m in (User, Image, AnnotationVersion, ModelVersion)}

    with pytest.raises(KeyboardInterrupt), session_scope(engine) as s:  # a crash mid-save
        users.get_or_create_user(s, "bob", "annotator")
        new_image = add_image(s, seed=7)
        model_version(s, "v9")
        annotation_versions.save_annotation(
            s, image.id, "lung", _box(0, 0, 9, 9), ann, "submitted", head.id
        )
        annotation_versions.save_annotation(
            s, new_image.id, "lung", _box(0, 0, 9, 9), ann, "draft", None
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
    mask = _box(3, 4, 20, 50)
    data = mask_to_png(mask)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(png_to_mask(data), mask)
    np.testing.assert_array_equal(png_to_mask(mask_to_png(mask.astype(np.uint8))), mask)
