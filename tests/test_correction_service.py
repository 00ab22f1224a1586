"""services.correction, the correction page's work without Streamlit: what each save button
does to the edit in progress, when a message is outdated, the version picker's words."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
from app_helpers import scope_for

from database import users, worklist
from services import correction, studies
from services.correction import MODEL, Note, Work, save_edit


def _study(url: str) -> tuple[object, int, studies.StudyInfo, studies.PredictionView]:
    scope = scope_for(url)
    with scope() as s:
        user_id = users.get_or_create_user(s, "Cora Corrector", "radiologist").id
        image_id = min(r.image_id for r in worklist.worklist(s))
    info = studies.study_info(scope, image_id)
    assert info is not None
    pred = studies.stored_prediction(scope, image_id, studies.active_model(scope))
    assert pred is not None
    return scope, user_id, info, pred


def test_save_edit_saves_refuses_and_says_so(app_env: str) -> None:
    scope, user_id, info, pred = _study(app_env)
    work = Work.on(None)
    assert (work.parent, work.base, work.base_label()) == (None, MODEL, "the model's mask")
    edited = pred.lung_mask.copy()
    edited[:10] = True

    def press(status: str, changed: bool = True, comment: str = "",
              head: studies.VersionInfo | None = None) -> Note:
        return save_edit(scope, info.image_id, "lung", work, edited, changed, head, user_id,
                         status, comment, pred.prediction_id)  # fmt: skip

    refused = press("returned")  # a send-back needs a comment; nothing is written
    assert refused.kind == "error" and "comment is required" in refused.text
    assert refused.nonce == work.nonce == 0 and studies.list_versions(scope, info.image_id,
                                                                      "lung") == []

    saved = press("draft")
    head = studies.head_version(scope, info.image_id, "lung")
    assert saved.kind == "success" and head is not None and work.parent == head.id
    assert saved.nonce == work.nonce == 1 and "Draft saved" in saved.text

    unchanged = press("draft", changed=False, head=head)
    assert unchanged.kind == "info" and f"version {head.id} as it is" in unchanged.text
    submitted = press("submitted", changed=False, head=head)  # the draft changes its status
    assert submitted.kind == "success" and work.parent == head.id
    assert [v.status for v in studies.list_versions(scope, info.image_id, "lung")] == [
        "submitted"
    ]

    stale = Work(parent=None, base=MODEL)  # drawn before that save: refused, kept as a draft
    note = save_edit(scope, info.image_id, "lung", stale, edited, True, head, user_id, "draft",
                     "", pred.prediction_id)  # fmt: skip
    assert note.kind == "error" and note.conflict is not None
    assert not note.outdated(stale, drawing=True)  # kept until the user resolves it
    versions = studies.list_versions(scope, info.image_id, "lung")
    assert versions[-1].id == note.conflict and versions[-1].conflict
    # Unchanged but begun before any version existed: refused the same way, not a status change.
    late = save_edit(scope, info.image_id, "lung", Work(parent=None, base=MODEL), edited, False,
                     head, user_id, "approved", "", pred.prediction_id)  # fmt: skip
    assert late.kind == "error" and late.conflict is not None
    assert studies.head_version(scope, info.image_id, "lung").id == head.id


def test_messages_go_stale_and_restart_drops_the_history() -> None:
    work = Work(parent=3, base=3, nonce=2)
    assert not Note("success", "ok", 2).outdated(work, drawing=False)
    assert Note("success", "ok", 2).outdated(work, drawing=True)  # the user draws again
    assert not Note("error", "no", 2).outdated(work, drawing=True)
    assert Note("error", "no", 1).outdated(work, drawing=False)  # another action since

    model = np.zeros((4, 4), bool)
    saved = np.ones((4, 4), bool)
    edits = work.edits_for(model, {3: saved}.__getitem__)
    assert edits.current().all() and work.base_label() == "version 3"
    work.restart(5, MODEL)
    assert (work.parent, work.base, work.nonce, work.canvas, work.edits) == (5, MODEL, 3, 1, None)
    assert not work.edits_for(model, {}.__getitem__).current().any()


def test_version_labels_and_the_approved_lock() -> None:
    when = datetime(2026, 1, 2, 3, 4, tzinfo=UTC)
    v = studies.VersionInfo(7, "lung", "approved", "Rad R", "radiologist", when, None, True, None)
    assert correction.version_label(MODEL, {}) == "Model's mask"
    assert correction.version_label(7, {7: v}) == (
        "Version 7 · approved · conflict draft · Rad R · 2026-01-02 03:04 UTC"
    )
    assert correction.approved_lock(True, v, revising=None)
    assert not correction.approved_lock(True, v, revising=7)  # revising on purpose
    assert not correction.approved_lock(False, v, revising=None)  # cannot edit anyway
    assert not correction.approved_lock(True, None, revising=None)
