"""Issue 16.9 in the tables (AppTest): a missing figure reads "—", never Streamlit's "None";
the worklist sorts on the figures it shows (the human ones where a study has them)."""

from __future__ import annotations

from pathlib import Path

import pytest
from accounts import ensure_account
from app_helpers import run_app, scope_for, sign_in

from database import users, worklist
from services import display, studies

INFECTION_SORT = "Infection % (highest first)"
SEVERITY_SORT = "Severity (highest first)"


def approve_whole_lung_infection(url: str, image_id: int) -> None:
    """A human infection mask covering the whole predicted lung: 100 %, severe (8/8)."""
    scope = scope_for(url)
    with scope() as s:
        annotator = users.get_or_create_user(s, "Ann Sorter", "annotator").id
        radiologist = users.get_or_create_user(s, "Rad Sorter", "radiologist").id
    pred = studies.stored_prediction(scope, image_id, studies.active_model(scope))
    saved = studies.save_mask(
        scope, image_id, "infection", pred.lung_mask.copy(), annotator, "submitted", None
    )
    assert saved.ok, saved.message
    assert studies.review_head(
        scope, image_id, "infection", radiologist, "approve", saved.version_id
    ).ok


def test_worklist_sorts_on_the_figures_it_shows(app_env: str) -> None:
    at = run_app()
    with scope_for(app_env)(write=False) as s:
        rows = [r for r in worklist.worklist(s) if r.infection_percent is not None]
    # The study the model finds least infected; its approved mask makes it the most infected.
    lowest = min(rows, key=lambda r: (r.infection_percent, r.severity_score))
    assert lowest.infection_percent < 100.0
    approve_whole_lung_infection(app_env, lowest.image_id)

    at.selectbox(key="worklist.sort").select(INFECTION_SORT).run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert table.iloc[0]["id"] == lowest.image_id
    assert table.iloc[0]["infection %"] == 100.0
    shown = list(table["infection %"])
    assert shown == sorted(shown, reverse=True), shown

    at.selectbox(key="worklist.sort").select(SEVERITY_SORT).run()
    table = at.dataframe[0].value
    assert table.iloc[0]["id"] == lowest.image_id
    assert table.iloc[0]["severity"] == "severe (8/8)"
    scores = [int(s.split("(")[1].split("/")[0]) for s in table["severity"]]
    assert scores == sorted(scores, reverse=True), scores


def test_missing_figures_read_as_a_dash_without_a_prediction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'nomodel.sqlite'}")
    monkeypatch.setenv("INFMAP_CHECKPOINT", str(tmp_path / "missing.pt"))
    at = run_app()
    frame = at.dataframe[0]
    table = frame.value
    assert len(table) == 6
    # Nothing predicted: the numbers are missing, and the table shows them as "—".
    for column in ("confidence", "infection %", "uncertainty"):
        assert table[column].isna().all(), column
    assert frame.proto.placeholder == display.MISSING
    assert set(table["class"]) == {display.MISSING} and set(table["masks"]) == {display.MISSING}
    for column in table.columns:
        assert not table[column].astype(str).eq("None").any(), column


def test_every_table_shows_missing_values_as_a_dash(app_env: str) -> None:
    """The Models page (a first version has no parent, no training time) and Correction's
    version history (a version with no parent, no Dice yet) use the same placeholder."""
    at = run_app()
    sign_in(at, "Tess Tables", "radiologist")
    at.switch_page("pages/models.py").run()
    assert not at.exception, at.exception
    assert at.dataframe, "the Models page shows its version table"
    assert at.dataframe[0].value.isna().any().any()  # something is missing
    assert {d.proto.placeholder for d in at.dataframe} == {display.MISSING}

    at.switch_page("pages/correction.py").run()
    at.button(key="correction.save.draft").click().run()
    assert not at.exception, at.exception
    assert at.dataframe[-1].proto.placeholder == display.MISSING
    assert {d.proto.placeholder for d in at.dataframe} == {display.MISSING}


def test_a_sent_back_version_is_named_sent_back_not_returned(app_env: str) -> None:  # noqa: F811
    """One status, one name: the version picker says "sent back", as the worklist does."""
    at = run_app()
    scope = scope_for(app_env)
    # Accounts with passwords, as an admin makes them: the annotator signs in below.
    ensure_account(app_env, "Ann Sender", "annotator")
    ensure_account(app_env, "Rad Returner", "radiologist")
    with scope() as s:
        study = min(r.image_id for r in worklist.worklist(s))
        annotator = users.get_user(s, "Ann Sender").id
        radiologist = users.get_user(s, "Rad Returner").id
    info = studies.study_info(scope, study)
    mask = studies.stored_prediction(scope, study, studies.active_model(scope)).lung_mask.copy()
    saved = studies.save_mask(scope, study, "infection", mask, annotator, "submitted", None)
    assert saved.ok, saved.message
    back = studies.review_head(
        scope, study, "infection", radiologist, "return", saved.version_id, "redo the base"
    )
    assert back.ok, back.message
    assert info.image_id == study

    sign_in(at, "Ann Sender", "annotator")
    at.switch_page("pages/correction.py").run()
    at.selectbox(key="correction.study").set_value(study).run()
    at.radio(key="correction.kind").set_value("infection").run()
    assert not at.exception, at.exception
    labels = at.selectbox(key="correction.view.infection").options
    assert any("sent back" in label for label in labels), labels
    assert not any("returned" in label for label in labels), labels


def test_header_fields_and_the_models_chart_read_cleanly(app_env: str) -> None:  # noqa: F811
    """Issue 16.9: the Review header summary names fields in words (no snake_case); the Models
    chart's legend sits above the plot, clear of the axis title."""
    import json

    at = run_app("pages/review.py")
    header = next(d.value for d in at.dataframe if list(d.value.columns) == ["Field", "Value"])
    assert len(header) and not header["Field"].str.contains("_").any(), list(header["Field"])
    at.switch_page("pages/models.py").run()
    assert not at.exception, at.exception
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    chart = next(s for s in specs if s["layout"].get("yaxis", {}).get("title", {}).get("text"))
    legend = chart["layout"]["legend"]
    assert legend["orientation"] == "h" and legend["y"] >= 1.0 and legend["yanchor"] == "bottom"


def test_one_study_is_counted_as_one_study(
    tmp_path: Path, random_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16.9: "1 of 1 study", not "1 studies"."""
    import shutil

    import probe_inputs as probe

    samples = tmp_path / "samples" / "Normal"
    samples.mkdir(parents=True)
    shutil.copy(probe.SAMPLES / "Normal" / "normal_1.png", samples)
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'one.sqlite'}")
    monkeypatch.setenv("INFMAP_CHECKPOINT", str(random_checkpoint))
    monkeypatch.setenv("INFMAP_SAMPLES_DIR", str(tmp_path / "samples"))
    monkeypatch.delenv("INFMAP_DATA_DIR", raising=False)
    at = run_app()
    captions = [c.value for c in at.caption]
    assert "1 of 1 study" in captions, captions
