"""The Models page (AppTest): activating a version the gate rejected, re-prediction in the
background, rolling back; the dataset export."""

from __future__ import annotations

from pathlib import Path

from app_helpers import TIMEOUT, run_app, scope_for, sign_in

from database import model_versions, worklist


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
