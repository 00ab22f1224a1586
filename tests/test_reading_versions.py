"""Reading versions (the reader's label + finding per study) against a real SQLite file:
append-only chains, the stale-save refusal kept as a conflict draft, review roles, what readers
and fine-tuning see, and the service the pages call."""

from __future__ import annotations

import pytest
from db_helpers import FakePrediction, add_image, count, model_version
from sqlalchemy import Engine

from database import predictions, reading_versions, users
from database.models import ReadingVersion
from database.session import session_scope
from database.versioning import RoleError, StaleVersionError
from services import reading_labels


def _people(engine: Engine) -> tuple[int, object, object, object]:
    with session_scope(engine) as s:
        image = add_image(s)
        ann = users.get_or_create_user(s, "ann", "annotator")
        bob = users.get_or_create_user(s, "bob", "annotator")
        rad = users.get_or_create_user(s, "rad", "radiologist")
    return image.id, ann, bob, rad


def test_reading_chain_is_append_only_with_parents(engine: Engine) -> None:
    image_id, ann, _bob, rad = _people(engine)
    with session_scope(engine) as s:
        pred = predictions.store_prediction(s, image_id, model_version(s).id, FakePrediction())
        v1 = reading_versions.save_reading(s, image_id, "Normal", "  ", ann, "draft", None,
                                           prediction_id=pred.id)
    with session_scope(engine) as s:
        v2 = reading_versions.save_reading(s, image_id, "Non-COVID", "RLL consolidation", ann,
                                           "submitted", v1.id)
    with session_scope(engine) as s:
        v3 = reading_versions.review_reading(s, image_id, rad, "approved", v2.id, "agreed")
    with session_scope(engine, write=False) as s:
        chain = reading_versions.list_readings(s, image_id)
        assert [v.id for v in chain] == [v1.id, v2.id, v3.id]
        assert [v.parent_id for v in chain] == [None, v1.id, v2.id]
        assert [v.status for v in chain] == ["draft", "submitted", "approved"]
        assert chain[0].finding is None and chain[0].prediction_id == pred.id
        assert (chain[2].label, chain[2].finding) == ("Non-COVID", "RLL consolidation")
        assert chain[2].author.name == "rad" and chain[2].comment == "agreed"
        assert reading_versions.head_reading(s, image_id).id == v3.id
    with pytest.raises(RuntimeError, match="append-only"), session_scope(engine) as s:
        s.get(ReadingVersion, v1.id).label = "COVID-19"
        s.flush()
    with pytest.raises(RuntimeError, match="never deleted"), session_scope(engine) as s:
        s.delete(s.get(ReadingVersion, v1.id))
        s.flush()
    assert count(engine, ReadingVersion) == 3


def test_unknown_label_and_review_roles_are_refused(engine: Engine) -> None:
    image_id, ann, _bob, _rad = _people(engine)
    with session_scope(engine) as s, pytest.raises(ValueError, match="label must be one of"):
        reading_versions.save_reading(s, image_id, "pneumonia", None, ann, "draft", None)
    with session_scope(engine) as s, pytest.raises(RoleError, match="radiologist"):
        reading_versions.save_reading(s, image_id, "Normal", None, ann, "approved", None)
    with session_scope(engine) as s:
        v1 = reading_versions.save_reading(s, image_id, "Normal", None, ann, "submitted", None)
    with session_scope(engine) as s, pytest.raises(RoleError, match="radiologist"):
        reading_versions.review_reading(s, image_id, ann, "approved", v1.id)
    assert count(engine, ReadingVersion) == 1


def test_stale_reading_save_is_refused_and_kept_as_conflict_draft(engine: Engine) -> None:
    image_id, ann, bob, _rad = _people(engine)
    with session_scope(engine) as s:
        v1 = reading_versions.save_reading(s, image_id, "Normal", None, ann, "submitted", None)
    # Ann and Bob both start from v1; Bob saves first.
    with session_scope(engine) as s:
        v2 = reading_versions.save_reading(s, image_id, "COVID-19", None, bob, "submitted", v1.id)
    out = reading_labels.save_reading(
        lambda write=True: session_scope(engine, write=write), image_id, "Non-COVID",
        "lobar", ann.id, "submitted", v1.id,
    )
    assert not out.ok and out.version_id is not None
    assert "bob saved a newer reading (submitted, version" in out.message
    assert f"Your reading was kept as draft version {out.version_id}" in out.message
    with session_scope(engine, write=False) as s:
        head = reading_versions.head_reading(s, image_id)
        kept = s.get(ReadingVersion, out.version_id)
        assert head.id == v2.id  # the conflict draft never becomes the head
        assert kept.conflict and kept.status == "draft" and kept.parent_id == v1.id
        assert (kept.label, kept.finding, kept.author.name) == ("Non-COVID", "lobar", "ann")
    # The same refusal straight from the database layer writes nothing.
    with session_scope(engine) as s, pytest.raises(StaleVersionError):
        reading_versions.save_reading(s, image_id, "Normal", None, ann, "draft", v1.id)
    assert count(engine, ReadingVersion) == 3


def test_current_and_training_readings_follow_review(engine: Engine) -> None:
    image_id, ann, _bob, rad = _people(engine)
    with session_scope(engine) as s:
        other = add_image(s, seed=1).id
        d = reading_versions.save_reading(s, other, "Normal", None, ann, "draft", None)
        v1 = reading_versions.save_reading(s, image_id, "Normal", None, ann, "submitted", None)
        a = reading_versions.review_reading(s, image_id, rad, "approved", v1.id)
        v3 = reading_versions.save_reading(s, image_id, "COVID-19", None, ann, "submitted", a.id)
        assert d.id  # drafts are nobody's reading yet
        current = reading_versions.current_readings(s)
        training = reading_versions.training_readings(s)
        # readers see the approved reading until the revision is approved; training the newest
        assert {k: v.id for k, v in current.items()} == {image_id: a.id}
        assert [v.id for v in training] == [v3.id]
        reading_versions.review_reading(s, image_id, rad, "returned", v3.id, "not convinced")
        assert reading_versions.current_readings(s) == {}
        assert reading_versions.training_readings(s) == []
        assert [v.id for v in reading_versions.training_readings(s, ("approved",))] == []


def test_service_flow_draft_submit_approve_and_agreement(engine: Engine) -> None:
    image_id, ann, _bob, rad = _people(engine)

    def scope(write: bool = True):
        return session_scope(engine, write=write)

    draft = reading_labels.save_reading(scope, image_id, "COVID-19", "bilateral GGO", ann.id,
                                        "draft", None)
    assert draft.ok and "draft" in draft.message
    assert reading_labels.current_readings(scope) == {}
    sub = reading_labels.change_reading_status(scope, image_id, ann.id, "submitted",
                                               draft.version_id)
    assert sub.ok and sub.version_id == draft.version_id  # submitted in place, no duplicate
    refused = reading_labels.change_reading_status(scope, image_id, ann.id, "approved",
                                                   draft.version_id)
    assert not refused.ok and "radiologist" in refused.message
    no_reason = reading_labels.change_reading_status(scope, image_id, rad.id, "returned",
                                                     draft.version_id)
    assert not no_reason.ok and "comment is required" in no_reason.message
    ok = reading_labels.change_reading_status(scope, image_id, rad.id, "approved",
                                              draft.version_id)
    assert ok.ok
    current = reading_labels.current_readings(scope)
    assert current[image_id].status == "approved" and current[image_id].author == "rad"
    assert current[image_id].finding == "bilateral GGO"
    assert reading_labels.agreement(current[image_id], "COVID-19") == "agrees"
    assert reading_labels.agreement(current[image_id], "Normal") == "disagrees"
    assert reading_labels.agreement(current[image_id], None) == ""
    cols = reading_labels.worklist_columns(image_id, "Normal", current)
    assert cols == {"reading": "COVID-19", "agreement": "✗ disagrees"}
    table = reading_labels.history_table(reading_labels.list_readings(scope, image_id))
    assert [r["status"] for r in table] == ["approved", "submitted"]
    assert table[0]["made on"] == f"v{draft.version_id}"


def test_not_a_class_reading_never_agrees_or_disagrees(engine: Engine) -> None:
    image_id, ann, _bob, _rad = _people(engine)

    def scope(write: bool = True):
        return session_scope(engine, write=write)

    out = reading_labels.save_reading(scope, image_id, "not assessable", "rotated, cut off",
                                      ann.id, "submitted", None)
    assert out.ok
    current = reading_labels.current_readings(scope)
    assert reading_labels.agreement(current[image_id], "COVID-19") == ""
    cols = reading_labels.worklist_columns(image_id, "COVID-19", current)
    assert cols == {"reading": "Not assessable (submitted)", "agreement": ""}
