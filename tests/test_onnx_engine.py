"""The ONNX Runtime engine gives the shipped model's predictions (issue 13.5).

Through ``inference.predict`` (the same calibrated thresholds and decisions), on the bundled sample
cases and the RG1 chest DICOM: masks Dice >= 0.999 against torch's, class probabilities within
1e-3, the same predicted class, the same CAM and out-of-domain score within tolerance.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from dicom_samples import pydicom_data_file

import settings
from inference import onnx_engine
from inference.batch import main as batch_main
from inference.loading import load_xray
from inference.model import LoadedModel, load_checkpoint
from inference.onnx_engine import OnnxEngine, forward_pass, onnx_path
from inference.predict import Prediction, predict
from services.prediction_view import gradcam_for

DICE_MIN = 0.999
PROB_TOL = 1e-3


def _cases() -> list[Path]:
    samples = sorted(
        p for p in settings.SAMPLES_DIR.glob("*/*.png")
        if not p.stem.endswith(("_lung", "_infection"))
    )
    assert len(samples) == 6, "the six bundled sample cases"
    return [*samples, pydicom_data_file("RG1_UNCR.dcm")]


CASES = _cases()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def shipped() -> LoadedModel:
    return load_checkpoint(settings.SHIPPED_CHECKPOINT)


@pytest.fixture(scope="module")
def onnx_model(shipped: LoadedModel, cache_dir: Path) -> LoadedModel:
    """The shipped checkpoint again, with its ONNX engine built from an empty cache."""
    model = load_checkpoint(settings.SHIPPED_CHECKPOINT)
    model.engines["onnx"] = OnnxEngine.for_model(model, cache_dir)
    return model


def assert_same_prediction(got: Prediction, want: Prediction) -> None:
    assert dice(got.lung_mask, want.lung_mask) >= DICE_MIN
    assert dice(got.infection_mask, want.infection_mask) >= DICE_MIN
    for name in want.class_names:
        assert abs(got.probabilities[name] - want.probabilities[name]) <= PROB_TOL, name
    assert got.predicted_class == want.predicted_class
    assert got.severity == want.severity
    assert np.abs(got.gradcam - want.gradcam).max() <= 1e-3
    if want.ood_score is not None:
        assert got.ood_score == pytest.approx(want.ood_score, rel=1e-3)
        assert got.in_domain == want.in_domain


@pytest.mark.parametrize("path", CASES, ids=[p.name for p in CASES])
def test_onnx_predictions_match_torch(
    path: Path, shipped: LoadedModel, onnx_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    xray = load_xray(path)
    monkeypatch.setenv("INFMAP_ENGINE", "torch")
    want = predict(xray, shipped)
    monkeypatch.setenv("INFMAP_ENGINE", "onnx")
    assert forward_pass(onnx_model) == onnx_model.engines["onnx"].forward_all  # really ONNX
    assert_same_prediction(predict(xray, onnx_model), want)


@pytest.mark.parametrize("class_name", ["COVID-19", "Normal"])
def test_cam_of_a_chosen_class_matches_torch(
    class_name: str, shipped: LoadedModel, onnx_model: LoadedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The page's CAM for a class the user picks (services.prediction_view) under ONNX."""
    pixels = load_xray(CASES[-1]).pixels  # RG1
    monkeypatch.setenv("INFMAP_ENGINE", "torch")
    want = gradcam_for(pixels, shipped, class_name)
    monkeypatch.setenv("INFMAP_ENGINE", "onnx")
    got = gradcam_for(pixels, onnx_model, class_name)
    assert np.abs(got - want).max() <= 1e-3 and want.max() > 0


def test_another_checkpoints_engine_is_told_apart(
    shipped: LoadedModel, random_checkpoint: Path, cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cache is keyed by the checkpoint: another checkpoint gets its own file, and its
    outputs, served in place of the shipped model's, fail the comparison above."""
    other = load_checkpoint(random_checkpoint)
    assert onnx_path(other, cache_dir) != onnx_path(shipped, cache_dir)
    wrong = load_checkpoint(settings.SHIPPED_CHECKPOINT)
    wrong.engines["onnx"] = OnnxEngine.for_model(other, cache_dir)
    xray = load_xray(CASES[0])
    monkeypatch.setenv("INFMAP_ENGINE", "torch")
    want = predict(xray, shipped)
    monkeypatch.setenv("INFMAP_ENGINE", "onnx")
    with pytest.raises(AssertionError):
        assert_same_prediction(predict(xray, wrong), want)


def test_dynamic_batch(onnx_model: LoadedModel) -> None:
    x = torch.randn(3, 1, 256, 256)
    with torch.inference_mode():
        want = onnx_model.model.forward_all(x)
    got = onnx_model.engines["onnx"].forward_all(x)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert torch.allclose(g, w, atol=1e-3, rtol=1e-3)


def test_falls_back_to_torch_when_export_fails(
    random_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken_export(net: object, path: Path) -> Path:
        raise RuntimeError(f"exporter failed writing {path}")

    monkeypatch.setattr(onnx_engine, "export_onnx", broken_export)
    monkeypatch.setenv("INFMAP_ENGINE", "onnx")
    monkeypatch.setenv("INFMAP_ONNX_CACHE", str(tmp_path / "patient-smith"))
    model = load_checkpoint(random_checkpoint)
    with caplog.at_level(logging.WARNING, logger="inference.onnx_engine"):
        p = predict(load_xray(CASES[0]), model)
    assert sum(p.probabilities.values()) == pytest.approx(1.0)
    assert forward_pass(model) == model.model.forward_all
    assert "ONNX engine unavailable" in caplog.text
    assert "smith" not in caplog.text and CASES[0].name not in caplog.text


def _batch_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_batch_cli_under_onnx_gives_torchs_rows(
    onnx_model: LoadedModel, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The batch CLI reads INFMAP_ENGINE too: same classes and severities, probabilities 1e-3."""
    caplog.set_level(logging.WARNING, logger="inference.onnx_engine")
    cached = sorted(cache_dir.iterdir())
    assert onnx_path(onnx_model, cache_dir) in cached
    monkeypatch.setenv("INFMAP_ONNX_CACHE", str(cache_dir))  # the export made above: no rebuild
    files = [str(p) for p in CASES]
    runs = {}
    for engine in ("torch", "onnx"):
        monkeypatch.setenv("INFMAP_ENGINE", engine)
        assert batch_main([*files, "--out", str(tmp_path / engine)]) == 0
        runs[engine] = _batch_rows(tmp_path / engine)
    assert len(runs["onnx"]) == len(CASES)
    for got, want in zip(runs["onnx"], runs["torch"], strict=True):
        assert not got["error"] and not want["error"]
        assert (got["file"], got["predicted_class"], got["severity"]) == (
            want["file"], want["predicted_class"], want["severity"])
        for column in ("p_covid19", "p_non_covid", "p_normal"):
            assert abs(float(got[column]) - float(want[column])) <= PROB_TOL
    # ONNX really served it (no fallback to torch) from the file already in the cache
    assert "ONNX engine unavailable" not in caplog.text
    assert sorted(cache_dir.iterdir()) == cached


def test_unknown_engine_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFMAP_ENGINE", "tensorrt")
    with pytest.raises(ValueError, match="INFMAP_ENGINE"):
        settings.inference_engine()


def test_auto_serves_onnx_only_once_the_file_is_built(
    cache_dir: Path, onnx_model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The default engine: ONNX Runtime for a checkpoint whose file is built, torch otherwise,
    and a prediction never builds one (it would keep a user waiting ~15 s)."""
    monkeypatch.delenv("INFMAP_ENGINE", raising=False)
    assert settings.inference_engine() == "auto"
    empty = tmp_path / "empty-cache"
    monkeypatch.setenv("INFMAP_ONNX_CACHE", str(empty))
    model = load_checkpoint(settings.SHIPPED_CHECKPOINT)
    predict(load_xray(CASES[0]), model)
    assert forward_pass(model) == model.model.forward_all
    assert not empty.exists() or not any(empty.iterdir())  # nothing exported in the request

    # Built by hand (make run does this for the shipped model): the file the fixture made.
    assert onnx_engine.main(["--checkpoint", str(settings.SHIPPED_CHECKPOINT),
                             "--cache-dir", str(cache_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(onnx_path(model, cache_dir))
    monkeypatch.setenv("INFMAP_ONNX_CACHE", str(cache_dir))
    served = forward_pass(model)
    assert isinstance(getattr(served, "__self__", None), OnnxEngine)
    assert_same_prediction(predict(load_xray(CASES[-1]), model),
                           _torch_prediction(CASES[-1], monkeypatch))
    # A model only in memory (training, tests) is not keyed on every prediction: torch.
    from dataclasses import replace

    in_memory = replace(model, sha256=None, engines={})
    assert forward_pass(in_memory) == in_memory.model.forward_all


def _torch_prediction(path: Path, monkeypatch: pytest.MonkeyPatch) -> Prediction:
    with monkeypatch.context() as m:
        m.setenv("INFMAP_ENGINE", "torch")
        return predict(load_xray(path), load_checkpoint(settings.SHIPPED_CHECKPOINT))


def test_batch_cli_builds_the_onnx_file_before_a_large_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from inference import batch

    monkeypatch.delenv("INFMAP_ENGINE", raising=False)
    fresh = tmp_path / "fresh-cache"
    monkeypatch.setenv("INFMAP_ONNX_CACHE", str(fresh))
    files = [str(p) for p in CASES]
    monkeypatch.setattr(batch, "AUTO_BUILD_MIN_IMAGES", len(files) + 1)
    assert batch_main([*files, "--out", str(tmp_path / "small")]) == 0
    assert not fresh.exists() or not any(fresh.iterdir())  # a small batch: torch, no export
    monkeypatch.setattr(batch, "AUTO_BUILD_MIN_IMAGES", len(files))
    assert batch_main([*files, "--out", str(tmp_path / "large")]) == 0
    assert [p.suffix for p in fresh.iterdir()] == [".onnx"]  # built first, then served
    for got, want in zip(_batch_rows(tmp_path / "large"), _batch_rows(tmp_path / "small"),
                         strict=True):
        assert (got["file"], got["predicted_class"], got["severity"]) == (
            want["file"], want["predicted_class"], want["severity"])
        for column in ("p_covid19", "p_non_covid", "p_normal"):
            assert abs(float(got[column]) - float(want[column])) <= PROB_TOL
