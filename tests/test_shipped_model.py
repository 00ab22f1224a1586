"""The shipped checkpoint loads and reproduces the prediction recorded when it was trained.

The reference was written by ``scripts/record_reference.py``; tolerances allow for float
differences between CPUs (kernel choice, thread count), not for a different model.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from inference.loading import load_xray
from inference.model import DEFAULT_CHECKPOINT, load_checkpoint
from inference.predict import predict

REPO = Path(__file__).resolve().parent.parent
REFERENCE = json.loads((REPO / "models" / "reference_prediction.json").read_text())


@pytest.fixture(scope="module")
def shipped():
    return load_checkpoint(DEFAULT_CHECKPOINT)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / float(total)


def test_shipped_checkpoint_is_the_recorded_one(shipped) -> None:
    assert DEFAULT_CHECKPOINT.stat().st_size < 20 * 1024 * 1024
    assert shipped.sha256 == REFERENCE["sha256"], "models/infmap.pt changed: re-record reference"
    assert shipped.version == REFERENCE["version"]
    assert shipped.meta["config"]["class_names"] == ["COVID-19", "Non-COVID", "Normal"]


@pytest.mark.parametrize("case", sorted(REFERENCE["cases"]))
def test_shipped_model_reproduces_recorded_prediction(shipped, case: str) -> None:
    ref = REFERENCE["cases"][case]
    pred = predict(load_xray(REPO / "samples" / case), shipped)

    assert pred.predicted_class == ref["predicted_class"]
    for name, p in ref["probabilities"].items():
        assert pred.probabilities[name] == pytest.approx(p, abs=2e-3)
    for key in ("infection_percent", "infection_percent_left", "infection_percent_right"):
        assert getattr(pred, key) == pytest.approx(ref[key], abs=0.5)
    assert pred.severity == ref["severity"]
    if ref.get("ood_score") is not None:  # 2.0.0 on: the out-of-domain score and flag
        assert pred.ood_score == pytest.approx(ref["ood_score"], rel=1e-2)
        assert pred.in_domain == ref["in_domain"]
    for kind, mask in (("lung_mask", pred.lung_mask), ("infection_mask", pred.infection_mask)):
        recorded = cv2.imread(str(REPO / "models" / ref[kind]), cv2.IMREAD_GRAYSCALE) > 127
        assert recorded.shape == mask.shape
        assert dice(mask, recorded) > 0.99, f"{kind} differs from the recorded one"


def test_shipped_model_is_sensible_on_the_samples(shipped) -> None:
    """Not a metric (that is the model card's Test evaluation): a guard against shipping a
    checkpoint that learnt nothing. The lungs of every sample are found (Dice > 0.9 with the
    ground-truth mask) and the clearly infected COVID-19 sample shows infection."""
    for case in REFERENCE["cases"]:
        path = REPO / "samples" / case
        pred = predict(load_xray(path), shipped)
        truth = cv2.imread(str(path.with_name(path.stem + "_lung.png")), cv2.IMREAD_GRAYSCALE) > 127
        assert dice(pred.lung_mask, truth) > 0.9, case
    covid = predict(load_xray(REPO / "samples" / "COVID-19" / "covid_1579.png"), shipped)
    assert covid.infection_percent > 20
