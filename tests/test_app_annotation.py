"""Saving and reviewing masks through the pages (AppTest): versions from the correction page,
the worklist's status filter, submitting a draft, the review queue first for radiologists, and
what readers see once a mask is approved.
"""

from __future__ import annotations

import numpy as np
from app_helpers import run_app, scope_for, sign_in

from database import annotation_versions, users, worklist
from services import studies


def test_saving_on_the_correction_page_creates_a_version(app_env: str) -> None:
    at = run_app("pages/correction.py")
    sign_in(at, "Saver Sam", "radiologist")
    study_id = at.selectbox(key="correction.study").value
    at.button(key="correction.save.submitted").click().run()
    assert not at.exception, at.exception
    assert any("Submitted for review: lung mask version" in s.value for s in at.success)

    scope = scope_for(app_env)
    with scope(write=False) as s:
        saved = annotation_versions.list_versions(s, study_id, "lung")
        assert [(v.author.name, v.status) for v in saved] == [("Saver Sam", "submitted")]
        first_id = saved[0].id

    at.button(key="correction.save.approved").click().run()  # radiologist approves the head
    assert any("Approved" in s.value for s in at.success)
    with scope(write=False) as s:
        saved = annotation_versions.list_versions(s, study_id, "lung")
        assert [(v.status, v.parent_id) for v in saved][-1] == ("approved", first_id)
    history = at.dataframe[-1].value  # the version history
    assert list(history["status"]) == ["approved", "submitted"]
    # Issue 16.9: an approved mask is not edited by accident; a revision is started on purpose.
    assert at.button(key="correction.save.draft").disabled
    assert at.button(key="correction.undo").disabled and at.button(key="correction.reset").disabled
    at.button(key="correction.revise").click().run()
    assert not at.button(key="correction.save.draft").disabled


def test_worklist_filters_by_status_after_a_save(app_env: str) -> None:
    scope = scope_for(app_env)
    with scope() as s:
        user_id = users.get_or_create_user(s, "Saver Sam", "radiologist").id
        study_id = worklist.worklist(s)[0].image_id
    info = studies.study_info(scope, study_id)
    mask = np.ones((info.height, info.width), bool)
    saved = studies.save_mask(scope, study_id, "lung", mask, user_id, "submitted", None)
    assert saved.ok, saved.message
    approved = studies.review_head(scope, study_id, "lung", user_id, "approve", saved.version_id)
    assert approved.ok, approved.message

    at = run_app()
    at.multiselect(key="worklist.status").select("approved").run()
    table = at.dataframe[0].value
    assert len(table) >= 1 and set(table["status"]) == {"approved"}
    assert (table["last touched by"] == "Saver Sam").all()


def test_submitting_a_saved_draft_changes_its_status_without_a_duplicate(app_env: str) -> None:
    """Issue 16.8: Save draft, then Submit with nothing changed: one version, now submitted."""
    at = run_app("pages/correction.py")
    sign_in(at, "Dora Drafter", "annotator")
    with scope_for(app_env)(write=False) as s:
        study_id = min(r.image_id for r in worklist.worklist(s))  # nobody else's
    at.selectbox(key="correction.study").set_value(study_id).run()
    at.radio(key="correction.kind").set_value("infection").run()
    at.button(key="correction.save.draft").click().run()
    assert any("Draft saved: infection mask version" in s.value for s in at.success)
    at.button(key="correction.save.submitted").click().run()
    assert not at.exception, at.exception
    assert any("Submitted for review: infection mask version" in s.value for s in at.success)
    with scope_for(app_env)(write=False) as s:
        saved = annotation_versions.list_versions(s, study_id, "infection")
        assert [(v.author.name, v.status) for v in saved] == [("Dora Drafter", "submitted")]
    at.button(key="correction.save.submitted").click().run()  # again: nothing to submit
    assert any("already submitted" in e.value for e in [*at.info, *at.error])


def test_next_study_sends_a_radiologist_to_the_review_queue_first(app_env: str) -> None:
    """Issue 16.7: with new studies left, a radiologist still gets the submitted one."""
    at = run_app()  # bootstraps the samples when this test runs alone
    scope = scope_for(app_env)
    with scope() as s:
        rows = worklist.worklist(s)
        target = max(r.image_id for r in rows if r.status == "new")
        author = users.get_or_create_user(s, "Queue Filler", "annotator")
        author_id = author.id
    with scope(write=False) as s:
        assert worklist.next_to_review(s, status="new") is not None  # new ones are left
    info = studies.study_info(scope, target)
    lung = np.zeros((info.height, info.width), bool)
    assert studies.save_mask(scope, target, "lung", lung, author_id, "submitted", None).ok

    sign_in(at, "Rita Radiologist", "radiologist")
    next(b for b in at.button if b.label == "Next study to review").click().run()
    assert not at.exception, at.exception
    opened = at.session_state["infmap.study_id"]
    with scope(write=False) as s:
        status = {r.image_id: r.status for r in worklist.worklist(s)}[opened]
    assert status == "submitted"


def test_readers_see_the_approved_mask_its_author_and_its_figures(app_env: str) -> None:
    """Issue 16.2: after approval, Review and the worklist show the human infection mask's
    figures (here: infection over the whole lung, 100 %), marked approved with its author."""
    at = run_app()
    scope = scope_for(app_env)
    with scope() as s:
        study = next(
            r.image_id for r in worklist.worklist(s) if r.display_name == "COVID-19/covid_1582.png"
        )
        annotator = users.get_or_create_user(s, "Ann Infection", "annotator").id
        radiologist = users.get_or_create_user(s, "Rad Approver", "radiologist").id
    model = studies.active_model(scope)
    pred = studies.stored_prediction(scope, study, model)
    assert pred.infection_percent < 100.0
    whole_lung = pred.lung_mask.copy()
    saved = studies.save_mask(scope, study, "infection", whole_lung, annotator, "submitted", None)
    assert saved.ok
    approved = studies.review_head(
        scope, study, "infection", radiologist, "approve", saved.version_id
    )
    assert approved.ok

    at.switch_page("pages/review.py")
    at.session_state["infmap.study_id"] = study
    at.run()
    assert not at.exception, at.exception
    both = next(m for m in at.metric if m.label == "Both lungs")
    assert both.value == "100.0 %"
    notes = " ".join(m.value for m in at.markdown)
    assert f"approved · version {approved.version_id} by Rad Approver (radiologist)" in notes
    at.segmented_control(key="review.source").set_value("Model output").run()
    both = next(m for m in at.metric if m.label == "Both lungs")
    assert both.value == f"{pred.infection_percent:.1f} %"

    at.switch_page("app.py").run()
    table = at.dataframe[0].value
    row = table[table["id"] == study].iloc[0]
    assert row["infection %"] == 100.0 and row["severity"] == "severe (8/8)"
    assert row["masks"] == "approved · Rad Approver"
