"""Preprocessing geometry, predict() on a small random checkpoint, lung sides, severity,
overlays."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from model_helpers import calibrated_random_model

from inference.model import LoadedModel, ModelConfig, load_checkpoint, save_checkpoint
from inference.overlay import heatmap_overlay, mask_overlay, to_uint8_rgb
from inference.predict import (
    infection_percentages,
    mean_binary_entropy,
    predict,
    split_lungs,
)
from inference.preprocess import Letterbox, normalise, preprocess
from inference.severity import grade, lung_score, severity

SMALL = ModelConfig(input_size=128, decoder_channels=[16, 8, 8, 8, 8])


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = tmp_path_factory.mktemp("ckpt") / "small.pt"
    save_checkpoint(calibrated_random_model(SMALL), path, meta={"version": "test-0"})
    return load_checkpoint(path)


def chest_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Float32 [0, 1] image with two bright-ish 'lung' ellipses and noise."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w), 0.3, np.float32)
    for cx in (0.3, 0.7):
        cv2.ellipse(img, (int(cx * w), h // 2), (w // 7, h // 3), 0, 0, 360, 0.7, -1)
    return np.clip(img + rng.normal(0, 0.05, (h, w)).astype(np.float32), 0, 1)


# --- preprocessing -------------------------------------------------------------------------------


def test_square_input_of_model_size_is_identity() -> None:
    img = chest_like(256, 256)
    x, box = preprocess(img, 256, 0.5, 0.25)
    assert box.is_identity and (box.top, box.left, box.new_h, box.new_w) == (0, 0, 256, 256)
    np.testing.assert_array_equal(x, normalise(img, 0.5, 0.25))
    prob = np.random.default_rng(1).random((256, 256)).astype(np.float32)
    np.testing.assert_array_equal(box.to_original(prob), prob)
    np.testing.assert_array_equal(box.mask_to_original(prob), prob > 0.5)


@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (1955, 1841), (97, 61), (256, 100)])
def test_letterbox_geometry(shape: tuple[int, int]) -> None:
    h, w = shape
    box = Letterbox.fit(h, w, 256)
    assert max(box.new_h, box.new_w) == 256
    assert abs(box.new_h / box.new_w - h / w) < 2 / min(box.new_h, box.new_w)
    # centred: the two pads differ by at most one pixel
    assert abs(box.top - (256 - box.top - box.new_h)) <= 1
    assert abs(box.left - (256 - box.left - box.new_w)) <= 1
    square = box.apply(np.ones((h, w), np.float32))
    assert square.shape == (256, 256) and square.dtype == np.float32
    # padding is exactly 0, content is exactly the (resized) image
    assert square.sum() == pytest.approx(box.new_h * box.new_w, rel=1e-5)
    np.testing.assert_allclose(box.crop(square), 1.0, atol=1e-6)


@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (1955, 1841), (97, 61)])
def test_mask_round_trip_through_letterbox(shape: tuple[int, int]) -> None:
    """Original mask -> letterbox (as the net would see it) -> back: equal up to resize error."""
    h, w = shape
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (int(0.3 * w), int(0.5 * h)), (w // 6, h // 3), 10, 0, 360, 1, -1)
    cv2.rectangle(mask, (int(0.6 * w), int(0.2 * h)), (int(0.85 * w), int(0.8 * h)), 1, -1)
    box = Letterbox.fit(h, w, 256)
    back = box.mask_to_original(box.apply(mask.astype(np.float32)))
    assert back.shape == (h, w) and back.dtype == bool
    wrong = back != mask.astype(bool)
    # errors only in a band around the boundary, about one network pixel wide
    band = math.ceil(max(h, w) / 256) + 1
    kernel = np.ones((2 * band + 1, 2 * band + 1), np.uint8)
    edge = cv2.dilate(mask, kernel) != cv2.erode(mask, kernel)
    assert not (wrong & ~edge).any()
    iou = (back & mask.astype(bool)).sum() / (back | mask.astype(bool)).sum()
    assert iou > 0.95
    # no shift: centroids agree to a fraction of a network pixel
    ys, xs = np.nonzero(mask)
    ys2, xs2 = np.nonzero(back)
    assert abs(ys.mean() - ys2.mean()) < band and abs(xs.mean() - xs2.mean()) < band


def test_preprocess_rejects_non_2d() -> None:
    with pytest.raises(ValueError):
        preprocess(np.zeros((10, 10, 3), np.float32), 256, 0.5, 0.25)


# --- lung sides and percentages ------------------------------------------------------------------


def two_lungs(h: int = 100, w: int = 120) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lung mask with an image-left (patient right) and image-right (patient left) block."""
    lung = np.zeros((h, w), bool)
    image_left = np.zeros_like(lung)
    image_left[20:80, 10:50] = True
    image_right = np.zeros_like(lung)
    image_right[20:80, 70:110] = True
    lung |= image_left | image_right
    return lung, image_left, image_right


def test_split_lungs_assigns_image_right_to_patient_left() -> None:
    lung, image_left, image_right = two_lungs()
    patient_left, patient_right = split_lungs(lung)
    np.testing.assert_array_equal(patient_left, image_right)
    np.testing.assert_array_equal(patient_right, image_left)


def test_infection_in_image_right_lung_is_patient_left() -> None:
    lung, _, image_right = two_lungs()
    infection = np.zeros_like(lung)
    infection[20:35, 70:110] = True  # a quarter of the image-right lung
    both, left, right = infection_percentages(lung, infection)
    assert left == pytest.approx(25.0)
    assert right == 0.0
    assert both == pytest.approx(12.5)


def test_infection_outside_lungs_is_ignored() -> None:
    lung, _, _ = two_lungs()
    infection = np.zeros_like(lung)
    infection[0:10, :] = True
    assert infection_percentages(lung, infection) == (0.0, 0.0, 0.0)


def test_small_fragments_join_their_side() -> None:
    lung, image_left, image_right = two_lungs()
    lung[90:93, 100:103] = True  # a speck low on the image right
    infection = np.zeros_like(lung)
    infection[90:93, 100:103] = True
    patient_left, patient_right = split_lungs(lung)
    assert patient_left[91, 101] and not patient_right[91, 101]
    assert (patient_left | patient_right).sum() == lung.sum()
    _, left, right = infection_percentages(lung, infection)
    assert left == pytest.approx(100 * 9 / (image_right.sum() + 9)) and right == 0.0


def test_single_component_falls_back_to_midline() -> None:
    lung = np.zeros((50, 100), bool)
    lung[10:40, 20:81] = True  # one blob, columns 20..80, midline at column 50
    patient_left, patient_right = split_lungs(lung)
    assert patient_left[10:40, 51:81].all() and not patient_left[:, :51].any()
    assert patient_right[10:40, 20:51].all()
    infection = np.zeros_like(lung)
    infection[10:40, 60:81] = True
    _, left, right = infection_percentages(lung, infection)
    assert left == pytest.approx(100 * 21 / 30) and right == 0.0


def test_empty_lungs_give_zero_percent() -> None:
    empty = np.zeros((40, 40), bool)
    assert infection_percentages(empty, empty) == (0.0, 0.0, 0.0)
    assert mean_binary_entropy(np.full((40, 40), 0.5, np.float32), empty) == 1.0


def test_entropy_in_bits() -> None:
    where = np.ones((4, 4), bool)
    assert mean_binary_entropy(np.full((4, 4), 0.5, np.float32), where) == pytest.approx(1.0)
    assert mean_binary_entropy(np.zeros((4, 4), np.float32), where) == pytest.approx(0.0, abs=1e-5)


# --- severity ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("percent", "score"),
    [(0, 0), (0.99, 0), (1.0, 1), (24.99, 1), (25.0, 2), (49.99, 2), (50.0, 3), (75.0, 3),
     (75.01, 4), (100, 4)],
)
def test_lung_score_boundaries(percent: float, score: int) -> None:
    assert lung_score(percent) == score


@pytest.mark.parametrize(
    ("total", "name"),
    [(0, "none"), (1, "mild"), (2, "mild"), (3, "moderate"), (5, "moderate"), (6, "severe"),
     (8, "severe")],
)
def test_grade_boundaries(total: int, name: str) -> None:
    assert grade(total) == name


def test_severity_sums_both_lungs() -> None:
    s = severity(80.0, 30.0)
    assert (s.score_left, s.score_right, s.score, s.grade) == (4, 2, 6, "severe")
    assert severity(0.5, 0.0).grade == "none"
    with pytest.raises(ValueError):
        lung_score(101.0)
    with pytest.raises(ValueError):
        grade(9)


# --- predict -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (97, 131)])
def test_predict_on_original_grid(loaded: LoadedModel, shape: tuple[int, int]) -> None:
    img = chest_like(*shape)
    p = predict(img, loaded)
    assert p.lung_mask.shape == shape and p.lung_mask.dtype == bool
    assert p.infection_mask.shape == shape and p.infection_mask.dtype == bool
    for arr in (p.lung_probability, p.infection_probability, p.gradcam):
        assert arr.shape == shape and arr.dtype == np.float32
        assert arr.min() >= 0.0 and arr.max() <= 1.0
    assert list(p.probabilities) == list(SMALL.class_names) == p.class_names
    assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert p.predicted_class == max(p.probabilities, key=p.probabilities.__getitem__)
    assert not (p.infection_mask & ~p.lung_mask).any()
    assert p.lung_mask.any(), "calibrated random model should find some 'lung'"
    for v in (p.infection_percent, p.infection_percent_left, p.infection_percent_right):
        assert 0.0 <= v <= 100.0
    assert (p.infection_percent, p.infection_percent_left, p.infection_percent_right) == (
        infection_percentages(p.lung_mask, p.infection_mask)
    )
    sev = severity(p.infection_percent_left, p.infection_percent_right)
    assert (p.severity, p.severity_score) == (sev.grade, sev.score)
    assert p.gradcam_class == p.predicted_class
    assert p.model_version == "test-0"
    assert 0.0 <= p.uncertainty <= 1.0
    assert set(p.timings_ms) == {"preprocess", "model", "gradcam", "postprocess"}
    assert all(v >= 0 for v in p.timings_ms.values())


def test_predict_square_input_matches_raw_network(loaded: LoadedModel) -> None:
    img = chest_like(128, 128, seed=3)
    p = predict(img, loaded)
    x = torch.from_numpy(normalise(img, SMALL.norm_mean, SMALL.norm_std))[None, None]
    with torch.inference_mode():
        masks, logits = loaded.model(x)
    np.testing.assert_allclose(p.lung_probability, torch.sigmoid(masks[0, 0]).numpy(), atol=1e-6)
    np.testing.assert_allclose(
        list(p.probabilities.values()), torch.softmax(logits[0], 0).numpy(), atol=1e-6
    )
    np.testing.assert_array_equal(
        p.infection_mask, (torch.sigmoid(masks[0, 1]).numpy() > 0.5) & p.lung_mask
    )


def test_predict_accepts_xray_like_and_is_deterministic(loaded: LoadedModel) -> None:
    img = chest_like(150, 180, seed=5)
    a = predict(img, loaded)
    b = predict(SimpleNamespace(pixels=img), loaded)
    np.testing.assert_array_equal(a.lung_probability, b.lung_probability)
    np.testing.assert_array_equal(a.gradcam, b.gradcam)
    assert a.probabilities == b.probabilities
    u8 = predict(np.rint(img * 255).astype(np.uint8), loaded)
    assert u8.lung_mask.shape == img.shape


def test_predict_gradcam_class_choice(loaded: LoadedModel) -> None:
    img = chest_like(120, 100)
    for name in SMALL.class_names:
        p = predict(img, loaded, gradcam_class=name)
        assert p.gradcam_class == name and p.gradcam.shape == img.shape
    with pytest.raises(ValueError, match="unknown class"):
        predict(img, loaded, gradcam_class="Flu")


def test_predict_puts_model_in_eval_mode(loaded: LoadedModel) -> None:
    loaded.model.train()
    img = chest_like(128, 128)
    a = predict(img, loaded)
    assert not loaded.model.training
    b = predict(img, loaded)
    np.testing.assert_array_equal(a.infection_probability, b.infection_probability)


# --- overlays ------------------------------------------------------------------------------------


def test_to_uint8_rgb() -> None:
    img = np.array([[0.0, 0.5], [1.0, 2.0]], np.float32)
    out = to_uint8_rgb(img)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [0, 0, 0] and out[1, 1].tolist() == [255, 255, 255]
    assert out[0, 1, 0] == 128


def test_mask_overlay_tints_inside_only() -> None:
    img = np.full((60, 80), 0.5, np.float32)
    mask = np.zeros((60, 80), bool)
    mask[20:40, 30:50] = True
    out = mask_overlay(img, mask, color=(255, 0, 0), opacity=0.4)
    assert out.shape == (60, 80, 3) and out.dtype == np.uint8
    inside = out[30, 40]
    assert inside[0] > inside[1] == inside[2]  # red tint, RGB order
    grey = np.rint(128 * 0.6)
    assert inside.tolist() == [np.rint(128 * 0.6 + 255 * 0.4), grey, grey]
    assert out[20, 40].tolist() == [255, 0, 0]  # contour at full colour
    assert (out[:10] == 128).all()  # far from the mask: unchanged
    np.testing.assert_array_equal(mask_overlay(img, np.zeros_like(mask)), to_uint8_rgb(img))
    with pytest.raises(ValueError):
        mask_overlay(img, mask[:10])


def test_heatmap_overlay() -> None:
    img = np.zeros((40, 50), np.float32)
    cam = np.zeros((40, 50), np.float32)
    cam[:, 25:] = 1.0
    out = heatmap_overlay(img, cam, opacity=1.0)
    assert out.shape == (40, 50, 3) and out.dtype == np.uint8
    assert out[0, 0, 2] > out[0, 0, 0]  # JET low end is blue (RGB order)
    assert out[0, 49, 0] > out[0, 49, 2]  # high end is red
    np.testing.assert_array_equal(heatmap_overlay(img, cam, opacity=0.0), to_uint8_rgb(img))


def test_overlays_on_prediction(loaded: LoadedModel) -> None:
    img = chest_like(210, 170)
    p = predict(img, loaded)
    for out in (
        mask_overlay(img, p.lung_mask, (0, 170, 255)),
        mask_overlay(img, p.infection_mask),
        heatmap_overlay(img, p.gradcam),
    ):
        assert out.shape == (210, 170, 3) and out.dtype == np.uint8


def test_checkpoint_path_is_used(loaded: LoadedModel) -> None:
    assert isinstance(loaded.path, Path) and loaded.path.name == "small.pt"
