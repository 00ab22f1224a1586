"""The reading on the Review page under AppTest (issue 11.1): record it, see it in the worklist
beside the model's class and in the history; a stale save is refused and kept as a draft."""

from __future__ import annotations

from app_helpers import run_app, scope_for, sign_in

from database import reading_versions, users, worklist
from services import reading_labels, studies
from services.text import md_escape


def _study(url: str, name: str = "Normal/normal_1.png") -> tuple[int, str]:
    with scope_for(url)(write=False) as s:
        row = next(r for r in worklist.worklist(s) if r.display_name == name)
        return row.image_id, row.predicted_class


def _open_review(at, study: int) -> None:  # noqa: ANN001
    at.switch_page("pages/review.py")
    at.session_state["infmap.study_id"] = study
    at.run()
    assert not at.exception, at.exception


def test_record_a_reading_and_see_it_in_worklist_and_history(app_env: str) -> None:
    at = run_app()
    study, predicted = _study(app_env)
    disagreeing = next(c for c in ("COVID-19", "Non-COVID", "Normal") if c != predicted)
    sign_in(at, "Rad Reader", "radiologist")
    _open_review(at, study)
    assert any("No reading recorded" in c.value for c in at.caption)
    at.radio(key=f"reading.label.{study}").set_value(disagreeing).run()
    at.text_area(key=f"reading.finding.{study}").input("right lower lobe consolidation")
    at.button(key="reading.save.submitted").click().run()
    assert not at.exception, at.exception
    assert any("Reading submitted for review: version" in s.value for s in at.success)
    at.button(key="reading.save.approved").click().run()  # the radiologist approves it as it is
    assert any("Reading approved: version" in s.value for s in at.success)
    assert any("differs from the model's class" in w.value for w in at.warning)
    history = at.dataframe[-1].value  # the reading history
    assert list(history["status"]) == ["approved", "submitted"]
    assert set(history["finding"]) == {"right lower lobe consolidation"}
    assert set(history["author"]) == {"Rad Reader (radiologist)"}

    with scope_for(app_env)(write=False) as s:
        current = reading_versions.current_readings(s)[study]
        assert (current.label, current.status, current.author.name) == (
            disagreeing, "approved", "Rad Reader")

    at.switch_page("app.py").run()
    table = at.dataframe[0].value
    row = table[table["id"] == study].iloc[0]
    assert row["class"] == predicted
    assert row["reading"] == reading_labels.LABEL_TEXT[disagreeing]
    assert row["agreement"] == "✗ disagrees"
    others = table[table["id"] != study]
    assert (others["reading"] == "").all() and (others["agreement"] == "").all()


def test_stale_reading_save_is_refused_and_kept_as_a_draft(app_env: str) -> None:
    at = run_app()
    study, predicted = _study(app_env)
    sign_in(at, "Ann Reader", "annotator")
    _open_review(at, study)
    assert not any(b.key == "reading.save.approved" for b in at.button)  # radiologists only
    # Someone else records a reading after Ann's form was shown.
    with scope_for(app_env)() as s:
        other = users.get_or_create_user(s, "Bob Quick", "annotator")
        first = reading_versions.save_reading(s, study, "COVID-19", None, other, "submitted",
                                              None)
        first_id = first.id
    at.radio(key=f"reading.label.{study}").set_value("Normal").run()
    at.button(key="reading.save.submitted").click().run()
    assert not at.exception, at.exception
    refusal = md_escape("Bob Quick saved a newer reading (submitted, version")  # shown literally
    assert any(refusal in e.value for e in at.error)
    with scope_for(app_env)(write=False) as s:
        versions = reading_versions.list_readings(s, study)
        head = reading_versions.head_reading(s, study)
    kept = versions[-1]
    assert head.id == first_id  # Bob's reading stays the head
    assert (kept.author.name, kept.label, kept.status, kept.conflict, kept.parent_id) == (
        "Ann Reader", "Normal", "draft", True, None)
    assert any(f"kept as your draft version {kept.id}" in i.value for i in at.info)
    history = at.dataframe[-1].value  # the reading history
    assert list(history["status"]) == ["draft (conflict draft)", "submitted"]

    # From the latest reading, Ann's save goes through.
    at.button(key="reading.take_latest").click().run()
    assert at.radio(key=f"reading.label.{study}").value == "COVID-19"
    at.radio(key=f"reading.label.{study}").set_value("Normal").run()
    at.button(key="reading.save.submitted").click().run()
    assert any("Reading submitted for review" in s.value for s in at.success)
    with scope_for(app_env)(write=False) as s:
        head = reading_versions.head_reading(s, study)
        assert (head.label, head.parent_id, head.author.name) == ("Normal", first_id,
                                                                  "Ann Reader")


def test_sorted_on_shown_figures_each_row_keeps_its_thumbnail_and_reading(
    app_env: str,  # noqa: F811
) -> None:
    """The worklist re-sorts its records on the figures shown (human masks' infection %); the
    thumbnail and reading of each row must follow its own study (they were paired by position
    with the database's order before, so a re-sorted row showed another study's)."""
    at = run_app()
    scope = scope_for(app_env)
    model = studies.active_model(scope)
    with scope(write=False) as s:
        rows = worklist.worklist(s, sort="infection")  # the database's order: the model's %
    preds = {r.image_id: studies.stored_prediction(scope, r.image_id, model) for r in rows}
    target = [r.image_id for r in rows if preds[r.image_id].lung_mask.any()][-1]
    assert rows[0].image_id != target  # the human figure has to move it up
    with scope() as s:
        ann = users.get_or_create_user(s, "Sort Tester", "annotator").id
        rad = users.get_or_create_user(s, "Sort Reader", "radiologist")
        reading_versions.save_reading(s, target, "Normal", None, rad, "approved", None)
    lung = preds[target].lung_mask
    assert studies.save_mask(scope, target, "infection", lung, ann, "submitted", None).ok

    at.selectbox(key="worklist.sort").select("Infection % (highest first)").run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    top = table.iloc[0]
    assert top["id"] == target and top["infection %"] == 100.0
    assert top["thumbnail"] == studies.thumbnail(scope, target)
    assert top["reading"] == "Normal"
    assert (table.iloc[1:]["reading"] == "").all()
