"""Annotation versions on a real SQLite file and a real PostgreSQL (conftest's ``engine``):
append-only chains, refused stale saves and conflict drafts, concurrent writers, review roles,
the fine-tuning set."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from db_helpers import (
    FakePrediction,
    add_image,
    box,
    count,
    model_version,
    save_or_keep_draft,
)
from sqlalchemy import Engine

from database import annotation_versions, predictions, users
from database.models import AnnotationVersion, User
from database.session import (
    make_engine,
    session_scope,
)
from database.versioning import RoleError, StaleVersionError

# --------------------------------------------------------------------------- annotation versions


def test_save_chain_is_append_only_and_leaves_prediction_untouched(engine: Engine) -> None:
    with session_scope(engine) as s:
        image = add_image(s)
        pred = predictions.store_prediction(s, image.id, model_version(s).id, FakePrediction())
        ann = users.get_or_create_user(s, "ann", "annotator")
    model_lung_png = pred.lung_mask_png

    with session_scope(engine) as s:
        v1 = annotation_versions.save_annotation(
            s, image.id, "lung", box(0, 0, 30, 30), ann, "draft", None, prediction_id=pred.id
        )
    with session_scope(engine) as s:
        v2 = annotation_versions.save_annotation(
            s, image.id, "lung", box(0, 0, 40, 40), ann, "submitted", v1.id
        )
        v3 = annotation_versions.save_annotation(
            s, image.id, "lung", box(0, 0, 45, 45), ann, "draft", v2.id
        )
    with session_scope(engine, write=False) as s:
        versions = annotation_versions.list_versions(s, image.id, "lung")
        assert [v.id for v in versions] == [v1.id, v2.id, v3.id]
        assert [v.parent_id for v in versions] == [None, v1.id, v2.id]
        assert versions[0].prediction_id == pred.id
        assert [v.status for v in versions] == ["draft", "submitted", "draft"]
        np.testing.assert_array_equal(
            annotation_versions.version_mask(versions[0]), box(0, 0, 30, 30)
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
    ann_mask, bob_mask = box(0, 0, 20, 20), box(10, 10, 40, 50)

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


@pytest.mark.parametrize("writers", [2, 3])
def test_concurrent_saves_on_the_same_head(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, writers: int
) -> None:
    """Writers, each with its own engine (its own connection), all based on the same head,
    saving at once: exactly one wins, every other mask is kept as a conflict draft."""
    with session_scope(engine) as s:
        image = add_image(s)
        names = ("ann", "bob", "carl")[:writers]
        people = [users.get_or_create_user(s, n, "annotator") for n in names]
        base = annotation_versions.save_annotation(
            s, image.id, "lung", box(0, 0, 9, 9), people[0], "draft", None
        )

    real_head = annotation_versions.head_version

    def slow_head(*args, **kwargs):  # widen the read-check-write window
        found = real_head(*args, **kwargs)
        time.sleep(0.3)
        return found

    monkeypatch.setattr(annotation_versions, "head_version", slow_head)
    barrier = threading.Barrier(writers)
    results: dict[str, object] = {}

    def save(user: User, mask: np.ndarray) -> None:
        eng = make_engine(engine.url)
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
        threading.Thread(target=save, args=(u, box(0, 0, 20 + 10 * i, 20)))
        for i, u in enumerate(people)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    winners = {n: r for n, r in results.items() if isinstance(r, int)}
    losers = {n: r for n, r in results.items() if isinstance(r, StaleVersionError)}
    assert len(winners) == 1 and len(losers) == writers - 1, results
    ((winner, win_id),) = winners.items()
    with session_scope(engine, write=False) as s:
        assert annotation_versions.head_version(s, image.id, "lung").id == win_id
        for loser, err in losers.items():
            assert err.head_author == winner and err.head_id == win_id
            kept = annotation_versions.get_version(s, err.conflict_version_id)
            assert kept.conflict and kept.author.name == loser and kept.parent_id == base.id
        assert len(annotation_versions.list_versions(s, image.id, "lung")) == 1 + writers


def test_approve_and_send_back_require_a_radiologist(engine: Engine) -> None:
    with session_scope(engine) as s:
        image = add_image(s)
        ann = users.get_or_create_user(s, "ann", "annotator")
        rad = users.get_or_create_user(s, "dr-rad", "radiologist")
        sub = annotation_versions.save_annotation(
            s, image.id, "lung", box(2, 2, 30, 30), ann, "submitted", None
        )

    with session_scope(engine) as s:
        with pytest.raises(RoleError):
            annotation_versions.approve_annotation(s, image.id, "lung", ann, sub.id)
        with pytest.raises(RoleError):
            annotation_versions.save_annotation(
                s, image.id, "lung", box(0, 0, 5, 5), ann, "approved", sub.id
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
            s, image.id, "lung", box(2, 2, 40, 40), ann, "submitted", back.id
        )
        ok = annotation_versions.approve_annotation(s, image.id, "lung", rad, fixed.id, "good")
        assert ok.status == "approved" and ok.author.role == "radiologist"
        np.testing.assert_array_equal(annotation_versions.version_mask(ok), box(2, 2, 40, 40))
    with session_scope(engine) as s, pytest.raises(ValueError):
        users.get_or_create_user(s, "ann", "radiologist")  # roles are not silently changed


# --------------------------------------------------------------------------- training data


def test_training_annotations_latest_submitted_or_approved(engine: Engine) -> None:
    with session_scope(engine) as s:
        ann = users.get_or_create_user(s, "ann", "annotator")
        rad = users.get_or_create_user(s, "rad", "radiologist")
        im = [add_image(s, seed=i).id for i in range(4)]
        m = box(0, 0, 10, 10)
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
