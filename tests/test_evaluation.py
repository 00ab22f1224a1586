"""Issue 11.5: the evaluation behind the CLI and the Evaluation page (one code path), its
folder readers and typed-path checks, and the page itself under AppTest."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from covid_qu_ex import build_mini_tree
from streamlit.testing.v1 import AppTest

import settings
from inference.model import CLASS_NAMES, load_checkpoint
from services import eval_figures, evaluation
from training import eval_sources
from training.evaluate import evaluate_set
from training.evaluate import main as evaluate_cli

APP = str(Path(__file__).resolve().parent.parent / "app.py")
TIMEOUT = 240


@pytest.fixture(scope="module")
def model(random_checkpoint: Path):  # noqa: ANN201
    return load_checkpoint(random_checkpoint)


# --------------------------------------------------------------------------- the shared path


def test_evaluate_set_reports_metrics_curves_rows_and_progress(model) -> None:  # noqa: ANN001
    source = eval_sources.load_folder(settings.SAMPLES_DIR, model.config.input_size)
    assert source.layout == "class-folders" and len(source.arrays) == 6
    assert source.has_lung_mask.all() and source.infection_masks
    calls: list[tuple[int, int]] = []
    result = evaluate_set(model, source.arrays, source.has_lung_mask, source.infection_masks,
                          batch_size=4, on_batch=lambda done, total: calls.append((done, total)))
    assert calls == [(4, 6), (6, 6)]
    m = result.metrics
    assert m["n_images"] == 6 and m["counts"] == dict.fromkeys(CLASS_NAMES, 2)
    assert np.array(m["classification"]["confusion_matrix"]).sum() == 6
    curves = m["curves"]
    assert set(curves["roc"]) == set(CLASS_NAMES)
    for points in curves["roc"].values():
        assert points["fpr"][0] == 0.0 and points["tpr"][-1] == 1.0
    assert len(curves["lung_dice"]) == 6 and len(curves["infection_dice_covid"]) == 2
    rc = curves["risk_coverage"]["by_confidence"]
    assert rc["coverage"][-1] == 1.0
    assert rc["accuracy"][-1] == pytest.approx(m["classification"]["accuracy"])
    assert curves["risk_coverage"]["by_ood_score"] is None  # a random checkpoint has no OOD
    assert len(result.per_image) == 6
    assert {"name", "true", "predicted", "lung_dice", "ood_score", "in_domain"} <= set(
        result.per_image[0])
    assert np.mean([r["lung_dice"] for r in result.per_image]) == pytest.approx(
        m["lungs"]["dice_mean"], abs=1e-4)


def test_risk_coverage_keeps_the_lowest_key_first() -> None:
    from training.eval_metrics import risk_coverage

    rc = risk_coverage(np.array([True, False, True, True]), np.array([0.1, 0.9, 0.2, 0.3]))
    assert rc["coverage"] == [0.25, 0.5, 0.75, 1.0]
    assert rc["accuracy"] == [1.0, 1.0, 1.0, 0.75]  # the wrong one (highest key) comes last


def test_the_page_and_the_cli_compute_the_same_numbers(
    tmp_path: Path, random_checkpoint: Path, model  # noqa: ANN001
) -> None:
    root = build_mini_tree(tmp_path / "mini", splits=("Test",))
    out = tmp_path / "cli"
    evaluate_cli(["--data", str(root), "--split", "Test", "--checkpoint",
                  str(random_checkpoint), "--out", str(out), "--cache-dir", "", "--no-plots"])
    cli = json.loads((out / "metrics.json").read_text())
    page = evaluation.evaluate_folder(root, model, "Test", 100)
    assert page.layout == "covid-qu-ex" and page.n_images == cli["n_images"] == 6
    for key in ("classification", "lungs", "infection", "domain", "counts"):
        assert json.loads(json.dumps(page.metrics[key])) == cli[key]
    assert json.loads((out / "curves.json").read_text()) == json.loads(
        json.dumps(page.metrics["curves"]))
    assert (out / "per_image.csv").read_text().splitlines()[0].startswith("name,true,predicted")


# --------------------------------------------------------------------------- folders


def _labels_csv_set(root: Path, rows: list[str]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "lung_masks").mkdir()
    for cls, stem in (("COVID-19", "covid_1579"), ("Normal", "normal_1")):
        shutil.copy(settings.SAMPLES_DIR / cls / f"{stem}.png", root / "images" / f"{stem}.png")
    shutil.copy(settings.SAMPLES_DIR / "Normal" / "normal_1_lung.png",
                root / "lung_masks" / "normal_1.png")
    (root / "labels.csv").write_text("\n".join(["file,label", *rows]) + "\n")
    return root


def test_labels_csv_layout_with_optional_masks(tmp_path: Path) -> None:
    root = _labels_csv_set(tmp_path / "ext", ["covid_1579.png,COVID-19", "normal_1.png,Normal"])
    s = eval_sources.load_folder(root.resolve(), 256)
    assert s.layout == "labels-csv" and list(s.arrays.labels) == [0, 2]
    assert list(s.has_lung_mask) == [False, True] and not s.infection_masks
    assert any("infection Dice is not reported" in n for n in s.notes)


@pytest.mark.parametrize(("rows", "message"), [
    (["../../etc/passwd,Normal"], "missing image"),
    (["covid_1579.png,Pneumothorax"], "labels InfMap does not know"),
])
def test_labels_csv_refusals(tmp_path: Path, rows: list[str], message: str) -> None:
    root = _labels_csv_set(tmp_path / "ext", rows)
    with pytest.raises(eval_sources.EvalSourceError, match=message):
        eval_sources.load_folder(root.resolve(), 256)


def test_a_folder_of_another_layout_is_refused_in_words(tmp_path: Path) -> None:
    (tmp_path / "random").mkdir()
    with pytest.raises(eval_sources.EvalSourceError, match="not a labelled set"):
        eval_sources.load_folder(tmp_path / "random", 256)


def test_the_limit_spreads_over_the_classes(model) -> None:  # noqa: ANN001
    s = eval_sources.load_folder(settings.SAMPLES_DIR, 256, limit=3)
    assert len(s.arrays) == 3 and set(s.arrays.labels) == {0, 1, 2}
    assert s.total_available == 6 and "3 of 6 images" in s.notes[0]


def test_typed_folder_paths_are_checked(tmp_path: Path) -> None:
    allowed = tmp_path / "data"
    (allowed / "set").mkdir(parents=True)
    (allowed / "file.png").write_bytes(b"x")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, allowed / "link")  # a link inside that leads outside
    roots = [allowed.resolve()]
    assert evaluation.resolve_folder(f"  {allowed / 'set'} ", roots) == (allowed / "set").resolve()
    cases = {
        "": "Type the path",
        str(allowed / "missing"): "There is no folder",
        str(allowed / "file.png"): "is a file, not a folder",
        str(outside): "outside the folders this app may read",
        str(allowed / "link"): "outside the folders this app may read",
        str(allowed / "set" / ".." / ".." / "elsewhere"): "outside the folders",
        "a\x00b": "not a folder path",
    }
    for typed, message in cases.items():
        with pytest.raises(evaluation.EvaluationInputError, match=message):
            evaluation.resolve_folder(typed, roots)
    # the default roots: samples/ (relative paths start at the repository) is allowed
    assert evaluation.resolve_folder("samples") == settings.SAMPLES_DIR.resolve()


def test_database_set_needs_approved_readings(engine) -> None:  # noqa: ANN001
    from database.session import session_scope

    with session_scope(engine, write=False) as s, pytest.raises(
        eval_sources.EvalSourceError, match="approved reading"
    ):
        eval_sources.load_database_set(s, 256)


def test_figures_and_downloads_from_one_report(model) -> None:  # noqa: ANN001
    report = evaluation.evaluate_folder(settings.SAMPLES_DIR, model, limit=6)
    figures = eval_figures.all_figures(report.metrics)
    assert set(figures) == {"confusion_matrix", "roc", "reliability", "dice_histograms",
                            "risk_coverage"}
    assert len(figures["dice_histograms"].data) == 2  # lungs and infection
    files = evaluation.downloads(report)
    assert set(files) == {"metrics.json", "per_image.csv", "curves.json"}
    saved = json.loads(files["metrics.json"][0])
    assert saved["classification"] == json.loads(json.dumps(report.metrics["classification"]))
    assert len(files["per_image.csv"][0].decode().splitlines()) == 7
    assert len(report.worst) == 6
    p_true = [w.p_true for w in report.worst]
    assert p_true == sorted(p_true)  # the worst first
    assert report.worst[0].file is not None and report.worst[0].thumbnail.startswith("data:")


# --------------------------------------------------------------------------- the page


@pytest.fixture
def app_env(tmp_path: Path, random_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'infmap.sqlite'}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("INFMAP_CHECKPOINT", str(random_checkpoint))
    monkeypatch.delenv("INFMAP_DATA_DIR", raising=False)
    monkeypatch.delenv("INFMAP_EVAL_ROOTS", raising=False)
    return url


def evaluation_page() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    at.switch_page("pages/evaluation.py").run()
    assert not at.exception, at.exception
    return at


def test_the_page_runs_on_the_bundled_samples_and_opens_a_worst_case(app_env: str) -> None:
    at = evaluation_page()
    assert at.text_input(key="evaluation.folder").value == "samples"
    at.button(key="evaluation.run").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert any("samples: 6 images" in h.value for h in at.subheader)
    charts = [c for c in at.get("plotly_chart")]
    assert len(charts) == 5
    summary, per_class = (d.value for d in at.dataframe)
    assert "3-class accuracy (shipped rule)" in set(summary["metric"])
    assert list(per_class["class"]) == list(CLASS_NAMES)
    assert any("kaleido" in c.value for c in at.caption) != eval_figures.png_export_available()
    at.button(key="evaluation.open.0").click().run()  # stored as a study, opened in Review
    assert not at.exception, at.exception
    assert [t.value for t in at.title] == ["Review"]


def test_a_failing_png_export_leaves_the_page_and_its_json_downloads_standing(
    app_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CI saw kaleido's Chromium fail to draw ("kaleido_scopes is not defined") and take the
    whole page down with "Something went wrong"."""
    import plotly.graph_objects as go

    calls: list[str] = []

    def broken_to_image(self: go.Figure, *args: object, **kwargs: object) -> bytes:
        calls.append("to_image")
        raise RuntimeError("ReferenceError: kaleido_scopes is not defined")

    monkeypatch.setattr(eval_figures, "png_export_available", lambda: True)
    monkeypatch.setattr(go.Figure, "to_image", broken_to_image)
    at = evaluation_page()
    at.button(key="evaluation.run").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert len(calls) == 5 * eval_figures.PNG_ATTEMPTS  # each figure tried, and once more
    assert any("PNG export failed for confusion_matrix" in c.value for c in at.caption)
    labels = {b.label for b in at.get("download_button")}
    assert "confusion_matrix.json" in labels and "confusion_matrix.png" not in labels


def test_the_page_refuses_a_bad_folder_in_words(app_env: str, tmp_path: Path) -> None:
    at = evaluation_page()
    at.text_input(key="evaluation.folder").input(str(tmp_path / "nowhere")).run()
    at.button(key="evaluation.run").click().run()
    assert not at.exception, at.exception
    assert any("There is no folder" in e.value for e in at.error)
    image = tmp_path / "x.png"
    cv2.imwrite(str(image), np.zeros((8, 8), np.uint8))
    at.text_input(key="evaluation.folder").input("/etc").run()
    at.button(key="evaluation.run").click().run()
    assert any("outside the folders this app may read" in e.value for e in at.error)
    assert not at.get("plotly_chart")


def test_database_set_reads_approved_readings_and_their_masks(engine) -> None:  # noqa: ANN001
    from database import annotation_versions, reading_versions, users
    from database.session import session_scope
    from inference.loading import load_xray
    from services.ingest import store_xray

    cases = (("COVID-19", "covid_1579"), ("Normal", "normal_1"), ("Non-COVID", "non_covid_11905"))
    with session_scope(engine) as s:
        rad = users.get_or_create_user(s, "Dr Rad", "radiologist")
        ids = []
        for cls, stem in cases:
            image, _ = store_xray(s, load_xray(settings.SAMPLES_DIR / cls / f"{stem}.png"),
                                  f"{stem}.png", "import")
            ids.append(int(image.id))
        reading_versions.save_reading(s, ids[0], "COVID-19", None, rad, "approved", None)
        reading_versions.save_reading(s, ids[1], "Normal", None, rad, "approved", None)
        reading_versions.save_reading(s, ids[2], "Non-COVID", None, rad, "submitted", None)
        lung = cv2.imread(str(settings.SAMPLES_DIR / "Normal" / "normal_1_lung.png"),
                          cv2.IMREAD_GRAYSCALE) > 127
        annotation_versions.save_annotation(s, ids[1], "lung", lung, rad, "approved", None)
    with session_scope(engine, write=False) as s:
        found = eval_sources.load_database_set(s, 256)
    assert found.image_ids == ids[:2]  # the submitted reading is not evaluated
    assert list(found.arrays.labels) == [0, 2]
    assert list(found.has_lung_mask) == [False, True] and not found.infection_masks
    assert found.arrays.lungs[1].sum() == (lung > 0).sum()  # 256x256 already: identity
