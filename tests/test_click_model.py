"""The click-refinement network (issue 14.1): before training it is the ordinary model; the
shipped one loads, gives the ordinary prediction without clicks, brings back a missed region
with one positive click and removes a false one with one negative click, on a bundled Test case
it never saw; the correction page's click commits go through the edit history (undo takes the
click back); and its training script runs and resumes on a miniature COVID-QU-Ex tree."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from covid_qu_ex import build_mini_tree
from scipy import ndimage

import settings
from inference.click_model import (
    CLICK_INPUTS,
    encode_guidance,
    forward_probabilities,
    is_click_model,
    refine_mask,
    with_click_inputs,
)
from inference.click_refine import EIGHT, Click
from inference.loading import load_xray
from inference.model import ModelConfig, build_model, load_checkpoint
from inference.predict import predict
from services.correction import apply_click
from services.editing import MaskEdits
from services.masks import dice

CASE = settings.SAMPLES_DIR / "COVID-19" / "covid_1582.png"
SMALL = ModelConfig(input_size=128, decoder_channels=[16, 8, 8, 8, 8])


@pytest.fixture(scope="module")
def network():  # noqa: ANN201
    return load_checkpoint(settings.SHIPPED_CLICK_CHECKPOINT)


@pytest.fixture(scope="module")
def case() -> dict[str, np.ndarray]:
    xray = load_xray(CASE)
    p = predict(xray, load_checkpoint(settings.SHIPPED_CHECKPOINT))
    truth = {k: cv2.imread(str(CASE.with_name(f"covid_1582_{k}.png")), cv2.IMREAD_GRAYSCALE) > 127
             for k in ("lung", "infection")}
    return {"pixels": xray.pixels, "lung": p.lung_mask, "infection": p.infection_mask,
            "lung_truth": truth["lung"], "infection_truth": truth["infection"]}


def centre(region: np.ndarray) -> tuple[int, int]:
    depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return int(y), int(x)


def test_click_inputs_start_as_the_ordinary_model() -> None:
    torch.manual_seed(0)
    base = build_model(SMALL).eval()
    click = with_click_inputs(base).eval()
    assert is_click_model(click) and click.config.in_channels == len(CLICK_INPUTS) == 7
    img = torch.rand(2, 1, 128, 128)
    guidance = (torch.rand(2, 6, 128, 128) > 0.7).float()  # clicks and masks of any kind
    with torch.inference_mode():
        expected = torch.sigmoid(base((img - SMALL.norm_mean) / SMALL.norm_std)[0])
    torch.testing.assert_close(forward_probabilities(click, img, guidance), expected)


def test_guidance_stamps_clicks_per_kind_and_sign() -> None:
    g = encode_guidance({"infection": [Click(10, 20, True), Click(40, 40, False)]},
                        {"lung": np.ones((64, 64), bool)}, (64, 64))
    assert g.shape == (6, 64, 64)
    assert g[3, 10, 20] == 1 and g[3, 40, 40] == 0 and g[4, 40, 40] == 1  # infection +, -
    assert g[0].sum() == g[1].sum() == 0 and g[2].all() and not g[5].any()
    assert g[3].sum() == 81  # one disk of radius 5 (81 pixels); the other is negative


def test_the_shipped_network_is_small_and_says_what_it_is(network) -> None:  # noqa: ANN001
    assert settings.SHIPPED_CLICK_CHECKPOINT.stat().st_size < 20 * 2**20
    assert is_click_model(network) and network.meta["kind"] == "click-refinement"
    assert "COVID-QU-Ex" in network.meta["training_data"]


def test_without_clicks_it_gives_the_ordinary_prediction(network, case) -> None:  # noqa: ANN001
    masks = {"lung": case["lung"], "infection": case["infection"]}
    # Near, not equal: the ordinary model's infection threshold is fitted on Val, the click
    # network's is 0.5 (measured on this case: Dice 0.89 for the infection).
    for kind, least in (("lung", 0.95), ("infection", 0.85)):
        refined = refine_mask(network, case["pixels"], kind, [], masks)
        assert dice(refined, case[kind]) > least, kind


def test_a_positive_click_brings_back_a_missed_region(network, case) -> None:  # noqa: ANN001
    mask, truth = case["infection"], case["infection_truth"]
    labels, n = ndimage.label(mask & truth, structure=EIGHT)
    assert n >= 1
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    lost = labels == int(np.argmax(sizes)) + 1  # the model's largest correct region, removed
    missed = mask & ~lost
    click = Click(*centre(lost), True)
    refined = refine_mask(network, case["pixels"], "infection", [click],
                          {"lung": case["lung_truth"], "infection": missed},
                          within=case["lung_truth"])
    assert dice(refined, truth) > dice(missed, truth) + 0.05
    assert (refined & lost).sum() > 0.6 * lost.sum()


def test_a_negative_click_removes_a_false_region(network, case) -> None:  # noqa: ANN001
    lung, truth = case["lung"], case["lung_truth"]
    h, w = lung.shape
    false = np.zeros_like(lung)
    false[int(0.02 * h):int(0.12 * h), int(0.02 * w):int(0.2 * w)] = True  # a corner: no lung
    assert not (false & truth).any()
    wrong = lung | false
    refined = refine_mask(network, case["pixels"], "lung", [Click(*centre(false), False)],
                          {"lung": wrong, "infection": case["infection"]})
    assert (refined & false).sum() < 0.2 * false.sum()
    assert dice(refined, truth) > dice(wrong, truth)


def test_refinement_keeps_full_resolution_detail_where_it_agrees(network, case) -> None:  # noqa: ANN001
    pixels = cv2.resize(case["pixels"], (600, 640), interpolation=cv2.INTER_LINEAR)
    lung = cv2.resize(case["lung"].astype(np.uint8), (600, 640),
                      interpolation=cv2.INTER_NEAREST) > 0
    ys, xs = np.nonzero(lung)
    notch = (ys[len(ys) // 2], xs[len(xs) // 2])  # one pixel inside a lung, unmarked
    edited = lung.copy()
    edited[notch] = False
    h, w = lung.shape
    false = np.zeros_like(lung)
    false[5:40, 250:350] = True
    refined = refine_mask(network, pixels, "lung", [Click(20, 300, False)],
                          {"lung": edited | false, "infection": np.zeros_like(lung)})
    assert refined.shape == (640, 600)
    assert not refined[notch]  # a one-pixel edit the network cannot see survives
    assert (refined & false).sum() < 0.2 * false.sum()


def test_the_page_click_commits_with_its_click_and_undo_takes_both_back(network, case) -> None:  # noqa: ANN001
    edits = MaskEdits.starting_from(case["lung"] | _square(case["lung"].shape))
    strokes = np.zeros((*case["lung"].shape, 4), np.uint8)
    y, x = centre(_square(case["lung"].shape))
    cv2.circle(strokes, (x, y), 4, (255, 0, 255, 255), -1)  # a remove mark (the erase colour)
    assert apply_click(edits, strokes, "lung", case["infection"], None, case["pixels"], network,
                       lambda: pytest.fail("the baseline's map is not needed"))  # fmt: skip
    assert edits.current_clicks() == ((y, x, False),)
    square = _square(case["lung"].shape)
    assert (edits.current() & square).sum() < 0.2 * square.sum()
    edits.undo()
    assert edits.current_clicks() == () and edits.current()[y, x]


def _square(shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, bool)
    out[int(0.02 * shape[0]):int(0.12 * shape[0]), int(0.4 * shape[1]):int(0.6 * shape[1])] = True
    return out


def test_train_click_runs_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from training.train_click import main

    root = tmp_path / "data"
    for split, copies in (("Train", 2), ("Val", 1)):
        build_mini_tree(root, copies=copies, splits=(split,))
    out, work = tmp_path / "click.pt", tmp_path / "work"
    common = ["--data", str(root), "--out", str(out), "--work-dir", str(work),
              "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4", "--val-images", "4",
              "--version", "click-0.0.1-test"]
    main([*common, "--max-steps", "2", "--epochs", "1"])
    assert "resumed" not in capsys.readouterr().out
    loaded = load_checkpoint(out)
    assert is_click_model(loaded) and loaded.version == "click-0.0.1-test"
    assert 0.0 <= loaded.meta["metrics"]["val"]["infection_dice@1"] <= 1.0
    history = json.loads((work / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1]  # epoch 0: the ordinary model's figures
    main([*common, "--max-steps", "4", "--epochs", "2"])
    assert "resumed at epoch 2, step 0/" in capsys.readouterr().out
    assert [h["epoch"] for h in json.loads((work / "history.json").read_text())] == [0, 1, 2]
