"""Segmentation and classification metrics on hand-made cases (training/metrics.py and the
metric helpers of training/evaluate.py). Pure numpy: milliseconds."""

from __future__ import annotations

import numpy as np
import pytest

from training.data import SplitArrays
from training.eval_metrics import (
    SplitPredictions,
    classification_metrics,
    compute_metrics,
    operating_point,
    reliability_bins,
)
from training.metrics import dice_iou_per_image, expected_calibration_error, pooled_dice_iou


def _mask(*pixels: tuple[int, int], size: int = 4) -> np.ndarray:
    m = np.zeros((size, size), bool)
    for r, c in pixels:
        m[r, c] = True
    return m


@pytest.fixture
def masks() -> tuple[np.ndarray, np.ndarray]:
    """Four 4x4 cases: partial overlap, both empty, false positive only, missed lesion."""
    gt = np.stack([
        _mask((0, 0), (0, 1), (1, 0), (1, 1)),  # 4 px
        _mask(),  # empty
        _mask(),  # empty
        _mask((3, 0), (3, 1), (3, 2), (3, 3), (2, 3)),  # 5 px
    ])
    pred = np.stack([
        _mask((0, 0), (0, 1), (2, 2), (2, 3)),  # 2 inside, 2 outside
        _mask(),  # empty
        _mask((1, 1), (1, 2), (1, 3)),  # 3 px, nothing to find
        _mask(),  # missed everything
    ])
    return pred, gt


def test_dice_iou_per_image_hand_computed(masks) -> None:
    pred, gt = masks
    dice, iou = dice_iou_per_image(pred, gt)
    # 1: |P∩G| = 2, |P| = |G| = 4 -> Dice 4/8, IoU 2/6. 2: both empty -> 1. 3, 4: one empty -> 0.
    np.testing.assert_allclose(dice, [0.5, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(iou, [2 / 6, 1.0, 0.0, 0.0])
    assert dice.dtype == np.float64 and dice.shape == (4,)


def test_dice_iou_identical_and_disjoint() -> None:
    a = _mask((0, 0), (1, 1), (2, 2))[None]
    b = _mask((3, 3))[None]
    assert dice_iou_per_image(a, a)[0][0] == 1.0 and dice_iou_per_image(a, a)[1][0] == 1.0
    assert dice_iou_per_image(a, b)[0][0] == 0.0 and dice_iou_per_image(a, b)[1][0] == 0.0


def test_dice_accepts_uint8_masks(masks) -> None:
    pred, gt = masks
    d_bool = dice_iou_per_image(pred, gt)[0]
    d_u8 = dice_iou_per_image(pred.astype(np.uint8) * 255, gt.astype(np.uint8))[0]
    np.testing.assert_allclose(d_bool, d_u8)


def test_pooled_dice_iou_hand_computed(masks) -> None:
    pred, gt = masks
    # Sums over the 4 images: |P∩G| = 2, |P| = 4+0+3+0 = 7, |G| = 4+0+0+5 = 9.
    dice, iou = pooled_dice_iou(pred, gt)
    assert dice == pytest.approx(2 * 2 / 16)
    assert iou == pytest.approx(2 / (16 - 2))


def test_pooled_all_empty_is_perfect() -> None:
    empty = np.zeros((3, 4, 4), bool)
    assert pooled_dice_iou(empty, empty) == (1.0, 1.0)
    d, i = pooled_dice_iou(empty, np.stack([_mask((0, 0)), _mask(), _mask()]))
    assert (d, i) == (0.0, 0.0)


def test_pooled_differs_from_mean_when_sizes_differ() -> None:
    # Big lesion found, small lesion missed: per-image mean 0.5, pooled dominated by the big one.
    big = np.ones((4, 4), bool)
    gt = np.stack([big, _mask((0, 0))])
    pred = np.stack([big, _mask()])
    assert dice_iou_per_image(pred, gt)[0].mean() == pytest.approx(0.5)
    assert pooled_dice_iou(pred, gt)[0] == pytest.approx(32 / 33)


ECE_PROBS = np.array([
    [0.90, 0.05, 0.05],  # conf 0.90, label 0: correct
    [0.90, 0.05, 0.05],  # conf 0.90, label 1: wrong
    [0.20, 0.65, 0.15],  # conf 0.65, label 1: correct
    [0.30, 0.20, 0.50],  # conf 0.50, label 0: wrong
])
ECE_LABELS = np.array([0, 1, 1, 0])


def test_ece_hand_computed() -> None:
    # 15 bins of width 1/15. Bin (0.867, 0.933]: 2 images, acc 0.5, conf 0.9 -> 2/4 * 0.40.
    # Bin (0.600, 0.667]: acc 1, conf 0.65 -> 1/4 * 0.35. Bin (0.467, 0.533]: acc 0, conf 0.5
    # -> 1/4 * 0.5. Total 0.2 + 0.0875 + 0.125.
    assert expected_calibration_error(ECE_PROBS, ECE_LABELS, 15) == pytest.approx(0.4125)
    # One bin: |accuracy 0.5 - mean confidence 0.7375|.
    assert expected_calibration_error(ECE_PROBS, ECE_LABELS, 1) == pytest.approx(0.2375)


def test_ece_perfect_and_reliability_bins_agree() -> None:
    probs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert expected_calibration_error(probs, np.array([0, 1])) == 0.0
    rel = reliability_bins(ECE_PROBS, ECE_LABELS, 15)
    assert sum(rel["count"]) == 4 and len(rel["edges"]) == 16
    ece = sum(
        n / 4 * abs(a - c)
        for n, a, c in zip(rel["count"], rel["accuracy"], rel["confidence"], strict=True)
        if n
    )
    assert ece == pytest.approx(0.4125)


def test_operating_point_respects_specificity() -> None:
    # 4 positives, 20 negatives; one negative outscores 3 positives, one positive scores lowest.
    scores = np.array([0.99, 0.9, 0.8, 0.05] + [0.95] + [0.1] * 19)
    positive = np.array([True] * 4 + [False] * 20)
    op = operating_point(scores, positive, 0.95)
    # Spec >= 0.95 allows 1 false positive of 20: threshold 0.8 -> 3/4 sensitivity.
    assert op["sensitivity"] == pytest.approx(0.75)
    assert op["specificity"] == pytest.approx(0.95)
    assert op["threshold"] == pytest.approx(0.8)
    assert operating_point(scores, np.ones(24, bool))["sensitivity"] is None


def test_classification_metrics_hand_computed() -> None:
    # Labels: 0 = COVID-19, 1 = Non-COVID, 2 = Normal.
    labels = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 0, 2])
    probs = np.full((6, 3), 0.1)
    probs[np.arange(6), pred] = 0.8
    m = classification_metrics(probs, labels)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert m["covid_sensitivity"] == pytest.approx(2 / 3)  # 2 of 3 COVID-19 found
    assert m["covid_specificity"] == pytest.approx(2 / 3)  # 1 of 3 others called COVID-19
    assert m["per_class"]["COVID-19"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["Normal"]["f1"] == pytest.approx(1.0)
    assert m["roc_auc"]["Normal"] == pytest.approx(1.0)
    assert m["roc_auc"]["macro"] is not None
    assert m["ece"] == pytest.approx(abs(4 / 6 - 0.8))


def test_compute_metrics_empty_rules_and_tolerance() -> None:
    n, s = 4, 20
    lungs = np.zeros((n, s, s), np.uint8)
    lungs[:, 2:18, 2:18] = 1  # 256 lung px per image
    infs = np.zeros_like(lungs)
    infs[0, 4:8, 4:8] = 1  # COVID-19 image with a lesion
    data = SplitArrays(np.zeros((n, s, s), np.uint8), lungs, infs, np.array([0, 1, 2, 2]),
                       ["a", "b", "c", "d"])
    pred_inf = np.zeros((n, s, s), bool)
    pred_inf[0, 4:8, 4:8] = True  # perfect on the COVID-19 image
    pred_inf[2, 5, 5] = True  # 1 px of 256 lung px (< 0.5%): not empty, but near empty
    pred_inf[3, 5:9, 5:9] = True  # 16 px: a real false positive
    probs = np.eye(3)[[0, 1, 2, 2]].astype(float)
    preds = SplitPredictions(probs=probs, lungs=lungs.astype(bool), infections=pred_inf)
    m = compute_metrics(data, preds)
    assert m["lungs"]["dice_mean"] == 1.0 and m["lungs"]["dice_pooled"] == 1.0
    assert m["infection"]["covid"]["n_images"] == 1
    assert m["infection"]["covid"]["dice_mean"] == 1.0
    rest = m["infection"]["non_covid_normal"]
    assert rest["n_images"] == 3
    assert rest["empty_share"] == pytest.approx(1 / 3)
    assert rest["near_empty_share"] == pytest.approx(2 / 3)
    assert m["counts"] == {"COVID-19": 1, "Non-COVID": 1, "Normal": 2}
