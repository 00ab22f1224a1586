"""The app without a browser: streamlit.testing.v1.AppTest on a temp database and a random
checkpoint, plus the services the pages stand on (ingest, masks from strokes, windows).

The canvas component does not render under AppTest (it returns its default: no strokes), so a
save here stores the mask the page started from; drawing is covered by tests/browser.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

import settings
from database import annotation_versions, model_versions, users, worklist
from database.session import init_db, session_scope
from services import bootstrap, display, identity, ingest, masks, studies

APP = str(Path(__file__).resolve().parent.parent / "app.py")
TIMEOUT = 180  # first run: migrations, model load, six sample predictions on a busy machine


@pytest.fixture(scope="module")
def bootstrapped(tmp_path_factory: pytest.TempPathFactory, random_checkpoint: Path) -> Path:
    """A database folder after the first start (tables, the random model, the six samples
    predicted), made once per module through the same service the app's start calls."""
    from inference.model import load_checkpoint

    folder = tmp_path_factory.mktemp("apptest")
    engine = init_db(f"sqlite:///{folder / 'infmap.sqlite'}")
    try:
        report = bootstrap.bootstrap(
            lambda write=True: session_scope(engine, write=write),
            random_checkpoint,
            settings.SAMPLES_DIR,
            load_checkpoint,
        )
    finally:
        engine.dispose()  # closes the WAL so the folder can be copied
    assert report.samples_found == 6 and not report.sample_errors
    return folder


@pytest.fixture
def app_env(
    bootstrapped: Path, tmp_path: Path, random_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """Each AppTest gets its own copy of the started database: no test sees another's saves."""
    folder = shutil.copytree(bootstrapped, tmp_path / "app")
    url = f"sqlite:///{folder / 'infmap.sqlite'}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("INFMAP_CHECKPOINT", str(random_checkpoint))
    monkeypatch.delenv("INFMAP_DATA_DIR", raising=False)
    monkeypatch.delenv("INFMAP_SAMPLES_DIR", raising=False)
    return url


def run_app(page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    if page is not None:
        at.switch_page(page).run()
        assert not at.exception, at.exception
    return at


def sign_in(at: AppTest, name: str, role: str = "annotator") -> None:
    at.sidebar.text_input(key="identity.name").input(name)
    at.sidebar.selectbox(key="identity.role").select(role)
    at.sidebar.button[0].click().run()
    assert not at.exception, at.exception


def scope_for(url: str):  # noqa: ANN201
    engine = init_db(url)

    def scope(write: bool = True):  # noqa: ANN202
        return session_scope(engine, write=write)

    return scope


# ----------------------------------------------------------------------------- AppTest
def test_worklist_shows_the_bundled_samples(app_env: str) -> None:
    at = run_app()
    assert [t.value for t in at.title] == ["Worklist"]
    table = at.dataframe[0].value
    names = set(table["study"].str.split(" · ").str[1])
    assert {"COVID-19/covid_1579.png", "Normal/normal_1.png"} <= names
    assert len(table) == 6
    assert set(table["status"]) == {"new"}
    assert table["class"].isin(["COVID-19", "Non-COVID", "Normal"]).all()
    assert table["thumbnail"].str.startswith("data:image/png;base64,").all()
    assert not at.error


def test_identity_gate_blocks_edits_without_a_name(app_env: str) -> None:
    at = run_app("pages/correction.py")
    assert any("Sign in first" in w.value for w in at.warning)
    assert at.button(key="correction.save.draft").disabled
    assert at.button(key="correction.save.submitted").disabled

    at.sidebar.button[0].click().run()  # "Sign in" with an empty name
    assert any("Enter your name" in e.value for e in at.sidebar.error)
    assert at.button(key="correction.save.draft").disabled

    sign_in(at, "Gate Keeper")
    assert not any("Sign in first" in w.value for w in at.warning)
    assert not at.button(key="correction.save.draft").disabled


def test_review_page_shows_probabilities_and_severity(app_env: str) -> None:
    at = run_app("pages/review.py")
    assert not at.error
    text = " ".join(m.value for m in at.markdown)
    assert "Predicted: **" in text
    labels = [m.label for m in at.metric]
    assert {"Both lungs", "Patient's right", "Patient's left", "Severity"} <= set(labels)
    assert any("Decision support only" in i.value for i in at.info)
    assert any("CXR extent score" in c.value for c in at.caption)
    assert [s.label for s in at.selectbox if s.label == "Grad-CAM explains"]


def test_review_page_prepares_a_dicom_seg_of_the_masks_shown(app_env: str) -> None:
    at = run_app("pages/review.py")
    assert not any(b.proto.label == "Download DICOM SEG" for b in at.get("download_button"))
    at.button(key="review.seg").click().run()
    assert not at.exception and not at.error, at.exception or at.error
    downloads = [b for b in at.get("download_button") if b.proto.label == "Download DICOM SEG"]
    assert len(downloads) == 1


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


# ----------------------------------------------------------------------------- services
def test_ingest_dedupes_and_reports_bad_files(tmp_path: Path, random_checkpoint: Path) -> None:
    from inference.model import load_checkpoint

    scope = scope_for(f"sqlite:///{tmp_path / 'db.sqlite'}")
    row, created = bootstrap.register_checkpoint(scope, random_checkpoint, load_checkpoint)
    assert created
    model = ingest.ModelHandle(row.id, row.version, load_checkpoint(random_checkpoint))
    ok, png = cv2.imencode(".png", (np.random.default_rng(1).random((128, 160)) * 255).astype("u1"))
    first = ingest.ingest_file(scope, png.tobytes(), "a.png", [model])
    again = ingest.ingest_file(scope, png.tobytes(), "copy.png", [model])
    bad = ingest.ingest_file(scope, b"hello, I am text\n" * 10, "notes.dcm", [model])
    assert first.ok and first.created and first.predicted == (row.version,)
    assert again.ok and not again.created and again.predicted == ()
    assert again.image_id == first.image_id
    assert not bad.ok and bad.image_id is None and len(bad.error) > 10
    # registering the same checkpoint again is a no-op
    assert bootstrap.register_checkpoint(scope, random_checkpoint, load_checkpoint)[1] is False


def test_strokes_add_and_erase_on_the_image_grid() -> None:
    base = np.zeros((100, 200), bool)
    base[:, :100] = True
    ch, cw = masks.canvas_size(*base.shape, max_side=400)
    assert (ch, cw) == (200, 400)
    rgba = np.zeros((ch, cw, 4), np.uint8)
    alpha = round(255 * masks.STROKE_ALPHA)
    rgba[20:60, 240:320] = (*masks.hex_to_rgb(masks.ADD_COLOR), alpha)  # add on the right
    rgba[100:140, 40:120] = (*masks.hex_to_rgb(masks.ERASE_COLOR), alpha)  # erase on the left
    edited = masks.composite_strokes(base, rgba)
    assert edited[10:30, 120:160].all()  # added, in image coordinates (half the canvas)
    assert not edited[50:70, 20:60].any()  # erased
    assert edited[80:, :100].all() and not edited[80:, 170:].any()  # untouched elsewhere
    assert masks.dice(base, base) == 1.0 and masks.dice(base, ~base) == 0.0
    assert masks.dice(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0
    assert masks.composite_strokes(base, None).sum() == base.sum()


def test_later_stroke_wins_where_see_through_strokes_overlap() -> None:
    add = np.array(masks.hex_to_rgb(masks.ADD_COLOR), float)
    erase = np.array(masks.hex_to_rgb(masks.ERASE_COLOR), float)
    a = masks.STROKE_ALPHA
    # erase painted over add, and add over erase ("over" compositing, un-premultiplied)
    out_alpha = a + a * (1 - a)
    erase_on_top = (erase * a + add * a * (1 - a)) / out_alpha
    add_on_top = (add * a + erase * a * (1 - a)) / out_alpha
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0, :3], rgba[0, 1, :3] = erase_on_top.round(), add_on_top.round()
    rgba[..., 3] = round(255 * out_alpha)
    added, erased = masks.stroke_layers(rgba)
    assert erased[0, 0] and added[0, 1]


def test_window_presets_follow_the_raw_range_and_inversion() -> None:
    raw = np.linspace(1000, 5000, 256 * 256, dtype=np.float32).reshape(256, 256)
    presets = display.window_presets(raw, (3000.0, 2000.0), invert=False)
    assert list(presets)[0] == "Header" and presets["Header"] == (3000.0, 2000.0)
    lo, hi = display.raw_range(raw)
    assert presets["Lung"][0] < presets["Bone"][0]  # lungs are the dark end
    assert presets["Full range"] == pytest.approx(((lo + hi) / 2, hi - lo))
    inverted = display.window_presets(raw, None, invert=True)
    assert "Header" not in inverted and inverted["Lung"][0] > inverted["Bone"][0]


def test_four_panels_share_zoom_and_scale() -> None:
    pixels = np.random.default_rng(0).random((1200, 1000)).astype(np.float32)
    mask = np.zeros(pixels.shape, bool)
    mask[300:900, 200:800] = True
    grid = display.DisplayGrid.for_shape(*pixels.shape)
    panels = display.panel_images(pixels, mask, mask, pixels, 0.4, grid)
    assert [p.shape for p in panels] == [(*grid.shape, 3)] * 4
    fig = display.panels_figure(panels, grid)
    images = [t for t in fig.data if t.type == "image"]
    assert len(images) == 4
    scales = [t for t in fig.data if t.type == "scatter" and t.marker.showscale]
    assert len(scales) == 1 and scales[0].xaxis == "x4"  # the Grad-CAM's colour bar
    marks = [(a.text, a.xref) for a in fig.layout.annotations if a.text in ("<b>R</b>", "<b>L</b>")]
    assert len(marks) == 8  # R and L on every panel
    assert {fig.layout[f"xaxis{i}"].matches for i in (2, 3, 4)} == {"x"}
    assert {fig.layout[f"yaxis{i}"].matches for i in (2, 3, 4)} == {"y"}
    assert fig.data[0].dx == pytest.approx(1200 / display.DISPLAY_MAX_SIDE)


def test_identity_rules() -> None:
    with pytest.raises(identity.IdentityError):
        identity.clean_name("   ")
    assert identity.clean_name("  Ada   Lovelace ") == "Ada Lovelace"
    rad = identity.Identity(1, "R", "radiologist")
    ann = identity.Identity(2, "A", "annotator")
    assert identity.can_review(rad) and not identity.can_review(ann)
    assert identity.can_edit(ann) and not identity.can_edit(None)


def test_version_table_has_dice_against_the_model() -> None:
    from datetime import UTC, datetime

    model = np.zeros((10, 10), bool)
    model[:5] = True
    v = studies.VersionInfo(3, "lung", "draft", "Ann", "annotator", datetime.now(UTC), None,
                            True, None)  # fmt: skip
    rows = studies.version_table([v], {3: model.copy()}, model)
    assert rows[0]["Dice vs model"] == 1.0 and "conflict draft" in rows[0]["status"]


def test_a_prediction_missing_while_the_model_could_not_load_is_not_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, random_checkpoint: Path
) -> None:
    """Issue 18: Review said "no prediction" for good once it had looked while the active
    model's file was unreadable; once the file is back the study is predicted."""
    import shutil

    checkpoint = tmp_path / "model.pt"
    shutil.copy(random_checkpoint, checkpoint)
    url = f"sqlite:///{tmp_path / 'flaky.sqlite'}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("INFMAP_CHECKPOINT", str(checkpoint))
    run_app()  # bootstrap: the model version and the samples
    sample = Path(__file__).resolve().parent.parent / "samples" / "Normal" / "normal_1.png"
    flipped = cv2.imencode(".png", cv2.imread(str(sample), cv2.IMREAD_GRAYSCALE)[:, ::-1])[1]
    added = ingest.ingest_file(scope_for(url), flipped.tobytes(), "flipped.png", [])
    assert added.ok and added.created

    checkpoint.rename(tmp_path / "away.pt")  # the model cannot be loaded for a while
    at = run_app()
    at.switch_page("pages/review.py")
    at.session_state["infmap.study_id"] = added.image_id
    at.run()
    assert any("No prediction" in w.value for w in at.warning)

    (tmp_path / "away.pt").rename(checkpoint)
    at = run_app()
    at.switch_page("pages/review.py")
    at.session_state["infmap.study_id"] = added.image_id
    at.run()
    assert not at.exception, at.exception
    assert not any("No prediction" in w.value for w in at.warning)
    assert any(m.label == "Both lungs" for m in at.metric)


def test_without_a_checkpoint_the_app_explains_instead_of_crashing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'nomodel.sqlite'}")
    monkeypatch.setenv("INFMAP_CHECKPOINT", str(tmp_path / "missing.pt"))
    at = run_app()
    assert any("No model checkpoint" in w.value for w in at.warning)
    table = at.dataframe[0].value
    assert len(table) == 6 and set(table["severity"]) == {"not predicted"}
    at.switch_page("pages/review.py").run()
    assert not at.exception and any("No prediction" in w.value for w in at.warning)
    at.switch_page("pages/correction.py").run()
    assert not at.exception and any("no model mask" in w.value for w in at.warning)


def test_models_page_confirms_a_rejected_version_and_repredicts_in_the_background(
    app_env: str, tmp_path: Path, random_checkpoint: Path
) -> None:
    """Issue 16.3: a version the gate rejected is activated only after a confirmation that
    says why; activation then predicts every study with it in the background; roll back."""
    from inference.model import file_sha256, load_checkpoint, save_checkpoint
    from services import model_admin

    base = load_checkpoint(random_checkpoint)  # same weights, its own version and file hash
    second = save_checkpoint(base.model, tmp_path / "second.pt", meta={"version": "second-test"})
    at = run_app()
    scope = scope_for(app_env)
    reason = "held-aside Dice 0.412 does not beat the base's 0.518"
    with scope() as s:
        first = model_versions.get_active_model_version(s)
        first_id, first_name = first.id, first.version
        new = model_versions.register_model_version(
            s,
            "second-test",
            second,
            file_sha256(second),
            metrics={"val": {"lung_dice": 0.5}, "decision": {"activate": False, "reason": reason}},
            parent=first,
        )
        new_id = new.id

    at.switch_page("pages/models.py").run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert set(table["version"]) >= {first_name, "second-test"}
    assert table.loc[table["version"] == first_name, "active"].item() == "●"
    assert next(b for b in at.button if b.label == "Activate").disabled  # nobody signed in

    at.switch_page("app.py").run()  # sign in from the worklist, then back
    sign_in(at, "Rhea Searcher", "researcher")
    at.switch_page("pages/models.py").run()
    at.selectbox(key="models.activate").select(new_id).run()
    next(b for b in at.button if b.label == "Activate").click().run()
    assert not at.exception, at.exception
    warning = next(w.value for w in at.warning if "rejected by the fine-tuning gate" in w.value)
    assert reason in warning
    with scope(write=False) as s:
        assert model_versions.get_active_model_version(s).id == first_id  # not yet

    at.button(key="models.confirm_activate").click().run()
    assert not at.exception, at.exception
    with scope(write=False) as s:
        assert model_versions.get_active_model_version(s).id == new_id
    job = model_admin.repredict_progress(app_env)
    assert job is not None and job.version == "second-test"
    job.thread.join(timeout=TIMEOUT)
    assert job.finished and job.failed == 0
    with scope(write=False) as s:
        rows = worklist.worklist(s, model_version_id=new_id)
        assert rows and all(r.prediction_id is not None for r in rows)
    at.switch_page("app.py").run()
    table = at.dataframe[0].value
    assert "not predicted" not in set(table["severity"]) and "—" not in set(table["class"])

    at.switch_page("pages/models.py").run()
    at.selectbox(key="models.activate").select(first_id).run()  # roll back: not rejected
    next(b for b in at.button if b.label == "Activate").click().run()
    with scope(write=False) as s:
        assert model_versions.get_active_model_version(s).id == first_id


def test_models_page_exports_the_dataset_for_researchers(app_env: str) -> None:
    at = run_app("pages/models.py")
    assert at.button(key="models.export.prepare").disabled  # nobody signed in
    at.switch_page("app.py").run()
    sign_in(at, "Rhea Searcher", "researcher")
    at.switch_page("pages/models.py").run()
    at.button(key="models.export.prepare").click().run()
    assert not at.exception, at.exception
    assert any("0 studies exported" in s.value for s in at.success)  # nothing approved yet
    assert [b for b in at.get("download_button") if b.proto.label == "Download dataset export"]
