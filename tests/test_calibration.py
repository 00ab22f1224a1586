"""Model 2.0's Val-chosen decisions (inference.calibration, training.calibrate), the lung-pooled
class head and the randomised-acquisition augmentation."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from inference.calibration import (
    Calibration,
    binarise_masks,
    clean_lung_mask,
    decide,
    in_domain,
    ood_scores,
)
from inference.model import ModelConfig, build_model, load_checkpoint, save_checkpoint
from training.calibrate import (
    GRADED_LIMIT,
    balanced_covid_threshold,
    choose_masks,
    fit_ood,
    fit_temperature,
)
from training.eval_metrics import severity_graded
from training.outputs import RawOutputs


def test_decision_rule_threshold_on_covid_else_likelier_other() -> None:
    probs = np.array([[0.40, 0.35, 0.25], [0.20, 0.50, 0.30], [0.30, 0.30, 0.40]])
    assert decide(probs, Calibration()).tolist() == [0, 1, 2]  # no rule: argmax
    rule = Calibration(covid_threshold=0.3)
    assert decide(probs, rule).tolist() == [0, 1, 0]
    assert decide(probs, Calibration(covid_threshold=0.45)).tolist() == [1, 1, 2]


def test_balanced_threshold_maximises_the_smaller_of_sensitivity_and_specificity() -> None:
    p = np.array([0.9, 0.8, 0.7, 0.35, 0.6, 0.3, 0.2, 0.1])
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    t, op = balanced_covid_threshold(p, y)
    assert 0.35 >= t > 0.3  # calls 0.35 positive, 0.3 negative: sens 1.0, spec 0.75
    assert op == {"sensitivity": 1.0, "specificity": 0.75}


def test_temperature_recovers_an_overconfident_scale() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 4000)
    true_logits = rng.normal(size=(4000, 3))
    true_logits[np.arange(4000), labels] += 1.0
    # sample labels from the true softmax, then make the model 3x overconfident
    p = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    sampled = np.array([rng.choice(3, p=row) for row in p])
    t = fit_temperature((3.0 * true_logits).astype(np.float32), sampled)
    assert t == pytest.approx(3.0, rel=0.15)


def test_clean_lung_mask_keeps_two_largest_and_fills_holes() -> None:
    m = np.zeros((40, 40), bool)
    m[5:30, 3:15] = True
    m[5:30, 22:36] = True
    m[10:14, 6:10] = False  # a hole
    m[35:37, 35:37] = True  # a speck
    out = clean_lung_mask(m)
    assert out[12, 8] and not out[36, 36]
    assert out.sum() == 25 * 12 + 25 * 14
    lungs, inf = binarise_masks(m.astype(np.float32), np.ones((40, 40), np.float32),
                                Calibration(clean_lungs=True))
    assert (inf == lungs).all()  # infection kept inside the (cleaned) lungs


def test_ood_score_is_far_for_shifted_features_and_threshold_passes_95_percent() -> None:
    rng = np.random.default_rng(1)
    train = rng.normal(size=(600, 20)).astype(np.float32)
    val = rng.normal(size=(400, 20)).astype(np.float32)
    cal, notes = fit_ood(train, val, components=10)
    assert notes["content"]["components"] == 10
    val_scores = ood_scores(torch.from_numpy(val), cal)
    assert val_scores is not None
    assert np.mean(val_scores <= cal.ood_threshold) == pytest.approx(0.95, abs=0.01)
    far = ood_scores(torch.from_numpy(val + 4.0), cal)
    assert far is not None and np.mean(far > cal.ood_threshold) > 0.99
    assert in_domain(float(val_scores[0]), cal) in (True, False)
    assert in_domain(float("nan"), cal) is False
    assert ood_scores(torch.zeros(1, 20), Calibration()) is None  # 1.0.0: no reference


def test_acquisition_shift_is_flagged_where_content_features_look_in_domain() -> None:
    """A new source can share Train's content features (a chest film) but not its acquisition
    statistics; either distance alone puts a study out of domain, and 95% of Val still pass."""
    rng = np.random.default_rng(2)
    content, style = 12, 6
    train = rng.normal(size=(800, content + style)).astype(np.float32)
    val = rng.normal(size=(500, content + style)).astype(np.float32)
    cal, notes = fit_ood(train, val, content_dims=content, components=8)
    assert notes["acquisition"]["dim"] == style
    val_scores = ood_scores(torch.from_numpy(val), cal)
    assert val_scores is not None
    assert np.mean(val_scores <= cal.ood_threshold) == pytest.approx(0.95, abs=0.01)
    new_source = val.copy()
    new_source[:, content:] = new_source[:, content:] * 0.3 + 3.0  # other contrast and noise
    shifted = ood_scores(torch.from_numpy(new_source), cal)
    assert shifted is not None and np.mean(shifted > cal.ood_threshold) > 0.99
    content_only, _ = fit_ood(train[:, :content], val[:, :content], components=8)
    unseen = ood_scores(torch.from_numpy(new_source), content_only)  # trailing columns ignored
    assert unseen is not None and np.mean(unseen <= content_only.ood_threshold) > 0.9


def test_calibration_survives_a_half_checkpoint_and_weights_only_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(head_pooling="lung"))
    cal = Calibration(temperature=1.7, covid_threshold=0.42, infection_threshold=0.4,
                      clean_lungs=True, ood_mean=torch.randn(8),
                      ood_projection=torch.randn(8, 3), ood_precision=torch.eye(3),
                      ood_threshold=2.5, notes={"fitted_on": "Val"})
    path = save_checkpoint(model, tmp_path / "m.pt", meta={"version": "t"}, half=True,
                           calibration=cal)
    loaded = load_checkpoint(path)  # weights_only=True inside
    got = loaded.calibration
    assert (got.temperature, got.covid_threshold, got.clean_lungs) == (1.7, 0.42, True)
    assert got.ood_precision is not None and got.ood_precision.dtype == torch.float32
    assert torch.equal(got.ood_projection, cal.ood_projection)
    assert loaded.config.head_pooling == "lung"


def test_lung_pooled_head_ignores_what_lies_outside_the_lungs() -> None:
    """Changing the last-stage features where the lung probability is ~0 leaves the class
    logits unchanged: the head averages only under the lungs."""
    from inference.model import lung_pooled_features

    torch.manual_seed(0)
    model = build_model(ModelConfig(head_pooling="lung")).eval()
    feats = torch.randn(1, 1280, 8, 8)
    lung_logits = torch.full((1, 1, 256, 256), -30.0)
    lung_logits[..., 64:192, 32:224] = 30.0  # lungs cover feature rows 2..5, cols 1..6
    head = model.net.classification_head
    base = head(lung_pooled_features(feats, lung_logits))
    changed = feats.clone()
    changed[..., 0, :] += 100.0  # feature row 0 is outside the lungs
    changed[..., :, 7] -= 50.0
    assert torch.allclose(head(lung_pooled_features(changed, lung_logits)), base, atol=1e-5)
    inside = feats.clone()
    inside[..., 3, 3] += 100.0
    assert not torch.allclose(head(lung_pooled_features(inside, lung_logits)), base, atol=1e-3)


def test_avg_head_is_unchanged_for_1_0_checkpoints() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig()).eval()
    x = torch.randn(1, 1, 256, 256)
    with torch.no_grad():
        masks, logits = model.net(x)  # smp's own forward
        ours_masks, ours_logits = model(x)
    assert torch.allclose(masks, ours_masks) and torch.allclose(logits, ours_logits)


def test_acquisition_augmentation_is_seeded_bounded_and_keeps_masks_aligned() -> None:
    from training.acquisition import random_letterbox, randomise_acquisition
    from training.augment import augment_v2

    g = torch.Generator().manual_seed(0)
    img = torch.rand(8, 1, 64, 64)
    masks = torch.zeros(8, 2, 64, 64)
    masks[:, 0, 16:48, 8:28] = 1
    a1, m1 = randomise_acquisition(img.clone(), masks.clone(), torch.Generator().manual_seed(3))
    a2, m2 = randomise_acquisition(img.clone(), masks.clone(), torch.Generator().manual_seed(3))
    assert torch.equal(a1, a2) and torch.equal(m1, m2)  # same seed, same batch
    assert float(a1.min()) >= 0.0 and float(a1.max()) <= 1.0 and torch.isfinite(a1).all()
    # letterbox moves image and mask together: the mask stays where the image content is
    boxed_img, boxed_mask = random_letterbox(img, masks, g, torch.ones(8, dtype=torch.bool))
    bars = boxed_img.sum(1) == 0
    assert bars.any() and not (boxed_mask[:, 0].bool() & bars).any()
    # no left-right flip anywhere: an asymmetric mask keeps its side
    _, m3 = augment_v2(img, masks, torch.Generator().manual_seed(5))
    left = m3[:, 0, :, :32].sum()
    right = m3[:, 0, :, 32:].sum()
    assert left > 3 * right


def test_external_reader_letterboxes_like_the_app(tmp_path: Path) -> None:
    from training.external import load_external

    (tmp_path / "images" / "src").mkdir(parents=True)
    (tmp_path / "lung_masks" / "src").mkdir(parents=True)
    img = np.full((100, 50), 200, np.uint8)
    cv2.imwrite(str(tmp_path / "images" / "src" / "a.jpg"), img)
    cv2.imwrite(str(tmp_path / "lung_masks" / "src" / "a.png"), np.full((100, 50), 255, np.uint8))
    cv2.imwrite(str(tmp_path / "images" / "src" / "b.png"), np.zeros((60, 60), np.uint8))
    (tmp_path / "labels.csv").write_text(
        "file,label,patient,has_lung_mask,license\n"
        "src/a.jpg,COVID-19,1,1,x\nsrc/b.png,Normal,2,0,x\n")
    ext = load_external(tmp_path, size=64)
    assert ext.arrays.images.shape == (2, 64, 64)
    assert ext.has_lung_mask.tolist() == [True, False]
    assert ext.arrays.labels.tolist() == [0, 2]
    # 100x50 -> 64x32 centred: black bars left and right, mask only on the content
    assert ext.arrays.images[0, :, :16].max() == 0 and ext.arrays.images[0, :, 20:44].min() > 150
    assert ext.arrays.lungs[0, :, :16].sum() == 0 and ext.arrays.lungs[0, :, 20:44].all()


def test_calibrate_cli_writes_both_ood_parts_and_the_new_version(
    tmp_path: Path, random_checkpoint: Path
) -> None:
    """``python -m training.calibrate`` on a miniature COVID-QU-Ex: the written checkpoint
    carries the content and acquisition references, its own version, and predictions get an
    out-of-domain score and flag."""
    from covid_qu_ex import build_mini_tree

    from inference.predict import predict
    from training.calibrate import main

    root = tmp_path / "qu-ex"
    for split, copies in (("Train", 3), ("Val", 2)):
        build_mini_tree(root, copies=copies, splits=(split,))
    out = tmp_path / "calibrated.pt"
    main(["--data", str(root), "--checkpoint", str(random_checkpoint), "--out", str(out),
          "--cache-dir", str(tmp_path / "cache"), "--version", "9.9.1", "--threads", "1"])
    loaded = load_checkpoint(out)
    cal = loaded.calibration
    assert loaded.version == "9.9.1"
    assert cal.has_ood and cal.style_mean is not None and cal.style_precision is not None
    stages = loaded.model.net.encoder.out_channels[1:5]
    assert cal.style_mean.shape[0] == 2 * sum(stages)
    assert cal.ood_mean is not None and cal.ood_mean.shape[0] == loaded.model.content_dims
    pred = predict(np.full((300, 260), 0.5, np.float32), loaded)
    assert pred.ood_score is not None and pred.in_domain is not None


def _two_lungs(n: int, size: int = 64) -> np.ndarray:
    lungs = np.zeros((n, size, size), dtype=np.float16)
    lungs[:, 8:56, 6:28] = 0.95
    lungs[:, 8:56, 36:58] = 0.95
    return lungs


def test_infection_threshold_never_buys_dice_by_grading_healthy_lungs() -> None:
    """Two COVID-19 images whose faint lesion rims (p = 0.3) are true lesion, two lesion-free
    images with a faint false blob (p = 0.3, 8% of a lung): Dice alone picks 0.10, which grades
    both healthy X-rays; the rule picks the best threshold that grades none of them."""
    n = 4
    lung_prob = _two_lungs(n)
    inf_prob = np.zeros_like(lung_prob)
    inf_gt = np.zeros((n, 64, 64), dtype=bool)
    for i in (0, 1):  # COVID-19: a core at 0.95 and a rim at 0.3, both lesion
        inf_gt[i, 20:40, 10:24] = True
        inf_prob[i, 20:40, 10:24] = 0.3
        inf_prob[i, 24:36, 13:21] = 0.95
    inf_prob[2:, 30:40, 40:49] = 0.3  # 90 pixels of a 1,056-pixel lung
    raw = RawOutputs(logits=np.zeros((n, 3), np.float32), lung_prob=lung_prob,
                     infection_prob=inf_prob, embedding=np.zeros((n, 4), np.float32), cams=None)
    covid = np.array([True, True, False, False])
    _, threshold, notes = choose_masks(raw, lung_prob > 0.5, inf_gt, covid)
    dice = {float(k): v for k, v in notes["infection_dice_by_threshold"].items()}
    graded = {float(k): v for k, v in notes["graded_without_lesion_by_threshold"].items()}
    assert max(dice, key=dice.get) == 0.10 and graded[0.10] == 1.0  # what Dice alone would pick
    assert graded[threshold] == 0.0 and threshold >= 0.3
    assert dice[threshold] == max(d for t, d in dice.items() if graded[t] <= GRADED_LIMIT)


def test_severity_graded_is_the_apps_rule_per_lung() -> None:
    lungs = _two_lungs(3).astype(np.float32) > 0.5
    inf = np.zeros_like(lungs)
    inf[1, 30:33, 40:43] = True  # 9 pixels: 0.9% of the patient's left lung, below the floor
    inf[2, 30:34, 40:43] = True  # 12 pixels: 1.1%, graded "mild"
    assert severity_graded(lungs, inf).tolist() == [False, False, True]
