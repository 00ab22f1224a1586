"""The pages in AppTest (streamlit.testing.v1) on a copy of a started database with a random
checkpoint: what each page shows, the sign-in gate, and a model that cannot be loaded.
Saving and reviewing masks: test_app_annotation; the Models page: test_app_models; the
services under the pages: test_page_services.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import pytest
from app_helpers import run_app, scope_for, sign_in

from services import ingest


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


def test_review_header_leaves_out_the_uid_stand_ins(app_env: str) -> None:
    from dicom_samples import pydicom_data_file

    rg1 = pydicom_data_file("RG1_UNCR.dcm").read_bytes()
    added = ingest.ingest_file(scope_for(app_env), rg1, "rg1.dcm", [])
    assert added.ok
    at = run_app()
    at.switch_page("pages/review.py")
    at.session_state["infmap.study_id"] = added.image_id
    at.run()
    assert not at.exception, at.exception
    (header,) = [d.value for d in at.dataframe if "Field" in d.value.columns]
    fields = set(header["Field"])
    assert {"Modality", "Patient hash"} <= fields
    assert not fields & {"Study uid", "Series uid", "Sop instance uid", "Sop class uid"}


def test_review_page_prepares_the_study_report(app_env: str) -> None:
    at = run_app("pages/review.py")
    at.button(key="review.report").click().run()
    assert not at.exception and not at.error, at.exception or at.error
    offered = [b for b in at.get("download_button") if b.proto.label == "Download study report"]
    assert len(offered) == 1

def test_a_prediction_missing_while_the_model_could_not_load_is_not_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, random_checkpoint: Path
) -> None:
    """Issue 18: Review said "no prediction" for good once it had looked while the active
    model's file was unreadable; once the file is back the study is predicted."""
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
