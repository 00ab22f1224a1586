"""Click-guided refinement (issue 14, the probability-guided baseline): on a bundled COVID-19
case with the shipped model, one positive click in a region the mask misses brings it back, one
negative click removes a false region; and the simulated annotator of benchmarks/interactive
clicks where the error is."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from scipy import ndimage

import settings
from benchmarks.interactive import dice, next_click, simulate
from inference.click_refine import EIGHT, Click, refine
from inference.loading import load_xray
from inference.model import load_checkpoint
from inference.predict import predict

CASE = settings.SAMPLES_DIR / "COVID-19" / "covid_1582.png"


@pytest.fixture(scope="module")
def case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the model's infection mask, its probability map, the reference infection mask)."""
    p = predict(load_xray(CASE), load_checkpoint(settings.SHIPPED_CHECKPOINT))
    truth = cv2.imread(str(CASE.with_name("covid_1582_infection.png")), cv2.IMREAD_GRAYSCALE)
    assert truth is not None and truth.shape == p.infection_mask.shape
    return p.infection_mask, p.infection_probability, truth > 127


def centre(region: np.ndarray) -> tuple[int, int]:
    depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return int(y), int(x)


def test_a_positive_click_brings_back_a_missed_region(case) -> None:  # noqa: ANN001
    mask, prob, truth = case
    labels, n = ndimage.label(mask & truth, structure=EIGHT)
    assert n >= 1
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    lost = labels == int(np.argmax(sizes)) + 1  # the model's largest correct region, removed
    missed = mask & ~lost
    y, x = centre(lost)
    refined = refine(missed, prob, [Click(y, x, True)], radius=0.03 * mask.shape[0])
    assert dice(refined, truth) > dice(missed, truth) + 0.05
    assert (refined & lost).sum() > 0.8 * lost.sum()  # most of it, from the model's map


def test_a_negative_click_removes_a_false_region(case) -> None:  # noqa: ANN001
    mask, prob, truth = case
    h, w = mask.shape
    false = np.zeros_like(mask)
    false[int(0.05 * h):int(0.15 * h), int(0.05 * w):int(0.15 * w)] = True  # outside the lungs
    assert not (false & truth).any()
    wrong = mask | false
    y, x = centre(false)
    refined = refine(wrong, prob, [Click(y, x, False)], radius=0.03 * h)
    assert not (refined & false).any()  # the whole false region, in one click
    assert dice(refined, truth) > dice(wrong, truth)
    np.testing.assert_array_equal(refined & ~false, wrong & ~false)  # nothing else touched


def test_the_simulated_annotator_clicks_at_the_largest_error() -> None:
    truth = np.zeros((64, 64), bool)
    truth[10:40, 10:40] = True
    mask = truth.copy()
    mask[20:30, 20:30] = False  # a hole: a positive click in its middle
    click = next_click(mask, truth)
    assert click is not None and click.positive and 20 <= click.y < 30 and 20 <= click.x < 30
    prob = truth.astype(np.float32) * 0.9
    trace = simulate(np.zeros_like(truth), truth, prob, "click", 2.0, None, max_clicks=5)
    assert trace.dices[0] == 0.0 and trace.dices[1] == 1.0  # one click fills the square
    brush = simulate(np.zeros_like(truth), truth, prob, "brush", 2.0, None, max_clicks=5)
    assert brush.dices[5] < 0.5  # a small brush needs many more
