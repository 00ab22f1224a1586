"""Issue 11.3: the out-of-domain score and flag are stored with each prediction, the worklist
filters and sorts by them, and Review says plainly when not to trust the model.

The app tests run the shipped model (2.0.0 carries the out-of-domain reference) on a
photograph shipped inside scikit-image, saved as PNG, and on pydicom-data's RG1 chest DICOM.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from db_helpers import FakePrediction, add_image, model_version
from sqlalchemy import Engine, inspect
from streamlit.testing.v1 import AppTest

import settings
from database import predictions
from database import worklist as worklist_queries
from database.session import current_revision, init_db, make_engine, session_scope, upgrade
from services import bootstrap, ingest, studies
from services.display import MISSING
from services.worklist_table import worklist_records

APP = str(Path(__file__).resolve().parent.parent / "app.py")
TIMEOUT = 240


# --------------------------------------------------------------------------- database


def test_migration_adds_nullable_domain_columns_to_an_older_database(db_path: Path) -> None:
    url = f"sqlite:///{db_path}"
    old = make_engine(url)
    upgrade(old, "0001")
    assert {"ood_score", "in_domain"}.isdisjoint(
        c["name"] for c in inspect(old).get_columns("predictions")
    )
    with session_scope(old) as s:  # a prediction stored by the older app: no such columns
        image, version = add_image(s), model_version(s)
        s.execute(_insert_0001(image.id, version.id))
    old.dispose()

    new = init_db(url)
    assert current_revision(new) != "0001"
    columns = {c["name"]: c for c in inspect(new).get_columns("predictions")}
    assert columns["ood_score"]["nullable"] and columns["in_domain"]["nullable"]
    with session_scope(new, write=False) as s:
        row = predictions.get_prediction(s, image.id, version.id)
        assert row is not None and row.ood_score is None and row.in_domain is None
    new.dispose()


def _insert_0001(image_id: int, version_id: int):  # noqa: ANN202 - a SQL text clause
    from sqlalchemy import text

    return text(
        "INSERT INTO predictions (image_id, model_version_id, probabilities, predicted_class,"
        " confidence, lung_mask_png, infection_mask_png, infection_percent,"
        " infection_percent_left, infection_percent_right, severity, severity_score,"
        " uncertainty, timings, created) VALUES (:i, :v, '{}', 'Normal', 1.0, x'', x'', 0, 0, 0,"
        " 'none', 0, 0.1, '{}', '2026-12-01 00:00:00')"
    ).bindparams(i=image_id, v=version_id)


@dataclasses.dataclass
class ScoredPrediction(FakePrediction):
    ood_score: float | None = None
    in_domain: bool | None = None


def test_prediction_stores_the_domain_score_and_fills_it_in_only_once(engine: Engine) -> None:
    with session_scope(engine) as s:
        v = model_version(s)
        scored = predictions.store_prediction(
            s, add_image(s, 1).id, v.id, ScoredPrediction(ood_score=23.4, in_domain=False)
        )
        plain = predictions.store_prediction(s, add_image(s, 2).id, v.id, FakePrediction())
        ids = scored.id, plain.id
    with session_scope(engine) as s:
        first, second = (s.get(predictions.Prediction, i) for i in ids)
        assert (first.ood_score, first.in_domain) == (pytest.approx(23.4), False)
        assert (second.ood_score, second.in_domain) == (None, None)
        predictions.set_domain(s, second.id, 3.5, True)
    with session_scope(engine) as s:
        assert s.get(predictions.Prediction, ids[1]).in_domain is True
        with pytest.raises(ValueError, match="already"):
            predictions.set_domain(s, ids[1], 99.0, False)  # a score is never rewritten


def _three_studies(engine: Engine) -> dict[str, int]:
    """In domain (score 5), out of domain (30), not scored (a 1.0.0-like prediction)."""
    with session_scope(engine) as s:
        v = model_version(s)
        ids = {}
        for seed, (name, score, flag) in enumerate(
            [("in", 5.0, True), ("out", 30.0, False), ("unscored", None, None)]
        ):
            image = add_image(s, seed, f"{name}.png")
            predictions.store_prediction(
                s, image.id, v.id, ScoredPrediction(ood_score=score, in_domain=flag)
            )
            ids[name] = image.id
        ids["unpredicted"] = add_image(s, 9, "unpredicted.png").id
    return ids


def test_worklist_filters_and_sorts_by_the_domain(engine: Engine) -> None:
    ids = _three_studies(engine)
    with session_scope(engine, write=False) as s:
        def listed(**kw: object) -> list[int]:
            return [r.image_id for r in worklist_queries.worklist(s, **kw)]

        assert listed(domain="out") == [ids["out"]]
        assert listed(domain="in") == [ids["in"]]
        assert set(listed(domain="unscored")) == {ids["unscored"], ids["unpredicted"]}
        assert set(listed(domain=["in", "out"])) == {ids["in"], ids["out"]}
        ordered = listed(sort="out_of_domain")
        assert ordered[:2] == [ids["out"], ids["in"]]  # highest score first, unscored last
        with pytest.raises(ValueError, match="domain"):
            listed(domain="elsewhere")
        row = next(r for r in worklist_queries.worklist(s) if r.image_id == ids["out"])
        assert (row.out_of_domain, row.in_domain) == (pytest.approx(30.0), False)


def test_worklist_records_name_the_domain(engine: Engine) -> None:
    ids = _three_studies(engine)

    def scope(write: bool = True):  # noqa: ANN202
        return session_scope(engine, write=write)

    rows = studies.worklist(scope, domains=["out", "unscored"], sort="out_of_domain")
    records = {r["id"]: r for r in worklist_records(rows)}
    assert set(records) == {ids["out"], ids["unscored"], ids["unpredicted"]}
    assert records[ids["out"]]["in domain"] == "no: out of domain"
    assert records[ids["unscored"]]["in domain"] == "not scored"
    assert records[ids["unpredicted"]]["in domain"] == MISSING  # nothing predicted yet
    assert "Out-of-domain score (highest first)" in studies.SORTS


def test_domain_verdict_in_plain_words() -> None:
    base = dict(
        prediction_id=1, model_version="2.0.0", probabilities={"COVID-19": 0.9},
        predicted_class="COVID-19", confidence=0.9, lung_mask=np.zeros((2, 2), bool),
        infection_mask=np.zeros((2, 2), bool), infection_percent=0.0, infection_percent_left=0.0,
        infection_percent_right=0.0, severity="none", severity_score=0, uncertainty=0.1,
        timings_ms={},
    )
    out = studies.domain_verdict(studies.PredictionView(**base, ood_score=23.4, in_domain=False),
                                 16.18)
    assert out.state == "out"
    assert "do not trust" in out.headline and "class or severity" in out.headline
    assert "unlike the chest X-rays the model was trained on" in out.detail
    assert "23.40" in out.detail and "16.18" in out.detail and "95%" in out.detail
    inside = studies.domain_verdict(studies.PredictionView(**base, ood_score=8.0, in_domain=True),
                                    16.18)
    assert inside.state == "in" and "8.00" in inside.detail
    unscored = studies.domain_verdict(studies.PredictionView(**base), None)
    assert unscored.state == "unscored"


# --------------------------------------------------------------------------- the app


def photograph_png() -> bytes:
    """scikit-image's "camera" photograph (bundled in the wheel), saved as a PNG."""
    import skimage.data

    image = cv2.imread(str(Path(skimage.data.data_dir) / "camera.png"), cv2.IMREAD_GRAYSCALE)
    assert image is not None
    return cv2.imencode(".png", image)[1].tobytes()


def rg1_bytes() -> bytes:
    from dicom_samples import pydicom_data_file

    return pydicom_data_file("RG1_UNCR.dcm").read_bytes()


@pytest.fixture(scope="module")
def shipped_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """A started database on the shipped model with the photograph and RG1 uploaded."""
    from inference.model import load_checkpoint

    folder = tmp_path_factory.mktemp("domain")
    engine = init_db(f"sqlite:///{folder / 'infmap.sqlite'}")

    def scope(write: bool = True):  # noqa: ANN202
        return session_scope(engine, write=write)

    try:
        report = bootstrap.bootstrap(
            scope, settings.SHIPPED_CHECKPOINT, settings.SAMPLES_DIR, load_checkpoint
        )
        assert report.samples_found == 6
        model = studies.active_model(scope)
        assert model is not None
        handle = ingest.ModelHandle(model.id, model.version, load_checkpoint(model.checkpoint_path))
        ids = {}
        for name, data in (("camera.png", photograph_png()), ("RG1_UNCR.dcm", rg1_bytes())):
            outcome = ingest.ingest_file(scope, data, name, [handle])
            assert outcome.ok, outcome.error
            ids[name] = outcome.image_id
    finally:
        engine.dispose()
    return folder, ids


@pytest.fixture
def shipped_app(
    shipped_db: tuple[Path, dict[str, int]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, dict[str, int]]:
    folder = shutil.copytree(shipped_db[0], tmp_path / "app")
    url = f"sqlite:///{folder / 'infmap.sqlite'}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("INFMAP_CHECKPOINT", str(settings.SHIPPED_CHECKPOINT))
    monkeypatch.delenv("INFMAP_DATA_DIR", raising=False)
    monkeypatch.delenv("INFMAP_SAMPLES_DIR", raising=False)
    return url, shipped_db[1]


def review(image_id: int) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    at.switch_page("pages/review.py")
    at.session_state["infmap.study_id"] = image_id
    at.run()
    assert not at.exception, at.exception
    return at


def stored(url: str, image_id: int) -> studies.PredictionView:
    engine = init_db(url)
    try:
        def scope(write: bool = True):  # noqa: ANN202
            return session_scope(engine, write=write)

        model = studies.active_model(scope)
        assert model is not None
        view = studies.stored_prediction(scope, image_id, model)
        assert view is not None
        return view
    finally:
        engine.dispose()


def test_a_photograph_is_out_of_domain_warned_and_not_called(
    shipped_app: tuple[str, dict[str, int]],
) -> None:
    url, ids = shipped_app
    pred = stored(url, ids["camera.png"])
    assert pred.in_domain is False and pred.ood_score is not None  # stored with the prediction
    at = review(ids["camera.png"])
    warning = " ".join(e.value for e in at.error)
    assert "Out of domain" in warning and "do not trust" in warning
    assert "unlike the chest X-rays the model was trained on" in warning
    assert f"{pred.ood_score:.2f}" in warning and "95% of the validation X-rays" in warning
    text = " ".join(m.value for m in at.markdown)
    assert "Predicted: **" not in text and "Class: **not called**" in text
    assert "Severity" not in [m.label for m in at.metric]  # no grade in large type
    assert "Both lungs" in [m.label for m in at.metric]  # the masks' figures are still there
    assert any(b.label == "Correct masks" for b in at.button)  # masks open for correction
    assert at.get("plotly_chart")  # the four panels and the probabilities


def test_the_rg1_chest_dicom_is_warned_exactly_when_the_model_calls_it_out_of_domain(
    shipped_app: tuple[str, dict[str, int]],
) -> None:
    url, ids = shipped_app
    pred = stored(url, ids["RG1_UNCR.dcm"])
    assert pred.in_domain is not None
    at = review(ids["RG1_UNCR.dcm"])
    warned = any("Out of domain" in e.value for e in at.error)
    text = " ".join(m.value for m in at.markdown)
    assert warned is (not pred.in_domain)
    assert ("Predicted: **" in text) is pred.in_domain
    assert "Domain**: " in text


def test_a_prediction_stored_before_the_columns_existed_is_scored_on_review(
    shipped_app: tuple[str, dict[str, int]],
) -> None:
    url, ids = shipped_app
    engine = init_db(url)
    try:
        with engine.begin() as conn:  # as the older app left it: no score
            conn.exec_driver_sql(
                "UPDATE predictions SET ood_score = NULL, in_domain = NULL WHERE image_id = ?",
                (ids["camera.png"],),
            )
    finally:
        engine.dispose()
    at = review(ids["camera.png"])
    assert any("Out of domain" in e.value for e in at.error)
    assert stored(url, ids["camera.png"]).in_domain is False


def test_worklist_page_filters_by_domain(shipped_app: tuple[str, dict[str, int]]) -> None:
    url, ids = shipped_app
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert "in domain" in table.columns and len(table) == 8
    at.multiselect(key="worklist.domain").select("Out of domain").run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert ids["camera.png"] in set(table["id"])
    assert set(table["in domain"]) == {"no: out of domain"}
    at.multiselect(key="worklist.domain").unselect("Out of domain").select("In domain").run()
    table = at.dataframe[0].value
    assert ids["camera.png"] not in set(table["id"]) and set(table["in domain"]) == {"yes"}
    at.multiselect(key="worklist.domain").unselect("In domain").run()
    at.selectbox(key="worklist.sort").select("Out-of-domain score (highest first)").run()
    scores = at.dataframe[0].value["ood score"].tolist()
    assert scores == sorted(scores, reverse=True)
