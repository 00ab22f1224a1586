"""Worklist queries on a real SQLite file and a real PostgreSQL: derived statuses, filters, SQL
sorting, next."""

from __future__ import annotations

import pytest
from db_helpers import (
    FakePrediction,
    add_image,
    box,
    model_version,
    save_or_keep_draft,
)
from sqlalchemy import Engine

from database import annotation_versions, predictions, users, worklist
from database.session import (
    session_scope,
)

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
        m = box(0, 0, 10, 10)
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
