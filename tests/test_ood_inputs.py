"""The out-of-domain benchmark: its input groups and its AUROC / threshold / risk-coverage maths."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from benchmarks import ood_inputs
from benchmarks.ood_separation import (
    GroupScores,
    Scored,
    auroc,
    fit_threshold,
    group_summary,
    labelled_summary,
    markdown,
    model_probabilities,
    model_score_fn,
    msp_score_fn,
    risk_coverage,
    run,
    score_group,
)
from inference.limits import MIN_SIDE
from inference.model import CLASS_NAMES, load_checkpoint

DATA = ood_inputs.DEFAULT_DATA
needs_data = pytest.mark.skipif(
    not ((DATA / "covid-qu-ex").is_dir() and (DATA / "external-dev").is_dir()),
    reason=f"COVID-QU-Ex / external-dev not found under {DATA}",
)


def assert_unit_images(images: list[ood_inputs.InputImage], group: str) -> None:
    assert images, f"group {group} is empty"
    for im in images:
        p = im.pixels
        assert p.dtype == np.float32 and p.ndim == 2, (im.name, p.dtype, p.shape)
        assert np.isfinite(p).all() and p.min() >= 0.0 and p.max() <= 1.0, im.name
        assert p.max() > p.min(), f"{im.name} is constant"
        assert min(p.shape) >= MIN_SIDE, (im.name, p.shape)
        assert im.group == group


@needs_data
@pytest.mark.parametrize("kind", sorted(ood_inputs.TRANSFORMS))
def test_transformed_test_xrays_are_unit_images(kind: str) -> None:
    originals = list(ood_inputs.covid_test(DATA, limit=3))
    out = list(ood_inputs.transformed(originals, kind, seed=1))
    assert_unit_images(out, kind)
    assert len(out) == 3 and all(im.label is None for im in out)
    for before, after in zip(originals, out, strict=True):
        assert not np.array_equal(before.pixels, after.pixels), kind


@needs_data
def test_chest_xray_groups_are_labelled_unit_images() -> None:
    test = list(ood_inputs.covid_test(DATA, limit=6))
    assert_unit_images(test, "covid-qu-ex-test")
    assert {im.label for im in test} == {0, 1, 2}  # the limit is spread over the classes
    ext = list(ood_inputs.external_dev(DATA, limit=4))
    assert_unit_images(ext, "external-dev")
    assert all(im.label in range(len(CLASS_NAMES)) for im in ext)


def test_dicom_groups_hold_what_their_names_say() -> None:
    skipped: list[dict] = []
    non_chest = list(ood_inputs.non_chest_radiographs(skipped))
    assert_unit_images(non_chest, "non-chest-radiographs")
    names = {im.name for im in non_chest}
    assert any(n.startswith("RG3_") for n in names)
    assert not any(n.startswith("RG1_") for n in names)  # RG1 is a chest: not in this group
    # RG3_UNCR and RG3_J2KR decode to the same pixels (lossless): only one is kept.
    assert len({"RG3_UNCR.dcm", "RG3_J2KR.dcm"} & names) == 1
    # The loader refuses these by header (EXTREMITY), so they come from the pydicom fallback.
    assert all(im.decoded_by == "pydicom+min-max" for im in non_chest)

    ct_mr = list(ood_inputs.ct_mr_slices(skipped))
    assert_unit_images(ct_mr, "ct-mr-slices")
    assert {"CT_small.dcm", "MR_small.dcm"} <= {im.name for im in ct_mr}
    # pydicom's 16 x 16 DICOMDIR thumbnails are reported, not scored.
    assert any("below the app's minimum" in s["reason"] for s in skipped)

    rg1 = list(ood_inputs.rg1_encodings())
    assert_unit_images(rg1, "rg1")
    assert len(rg1) == 4 and all(im.decoded_by == "load_xray" for im in rg1)


def test_photographs_come_from_the_wheel() -> None:
    photos = list(ood_inputs.photographs())
    assert_unit_images(photos, "photographs")
    assert {"camera.png", "astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"} <= {
        im.name for im in photos
    }


def test_transforms_do_what_they_say() -> None:
    image = np.arange(12, dtype=np.float32).reshape(3, 4) / 11
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(ood_inputs.rotate_90(image, rng), np.rot90(image))
    np.testing.assert_array_equal(ood_inputs.rotate_180(image, rng), image[::-1, ::-1])
    np.testing.assert_allclose(ood_inputs.invert(image, rng), 1 - image)
    big = np.random.default_rng(1).random((100, 80)).astype(np.float32)
    crops = [ood_inputs.crop_quarter(big, rng) for _ in range(20)]
    assert {c.shape for c in crops} == {(50, 40)}
    offsets = set()
    for c in crops:  # each crop is a window of the original, at varying places
        hits = [(t, left) for t in range(51) for left in range(41)
                if np.array_equal(big[t : t + 50, left : left + 40], c)]
        assert len(hits) == 1
        offsets.add(hits[0])
    assert len(offsets) > 1


def test_as_unit_float_scales_and_refuses_constant_images() -> None:
    out = ood_inputs.as_unit_float(np.array([[-1000, 0], [1000, 3000]], np.int16))
    np.testing.assert_allclose(out, [[0.0, 0.25], [0.5, 1.0]])
    assert out.dtype == np.float32
    with pytest.raises(ValueError, match="constant"):
        ood_inputs.as_unit_float(np.full((4, 4), 7))


# --- metrics on synthetic scores ----------------------------------------------------------------


def test_auroc_known_values() -> None:
    assert auroc([0.0, 1.0, 2.0], [3.0, 4.0]) == 1.0
    assert auroc([3.0, 4.0], [0.0, 1.0]) == 0.0  # higher score must mean more out of domain
    # Pairs (in, out): (0,1) (0,3) (2,3) ordered right, (2,1) wrong -> 3/4.
    assert auroc([0.0, 2.0], [1.0, 3.0]) == pytest.approx(0.75)
    assert auroc([1.0, 1.0], [1.0]) == pytest.approx(0.5)  # ties count half
    with pytest.raises(ValueError):
        auroc([], [1.0])


def test_threshold_lets_the_pass_rate_of_val_through() -> None:
    val = np.arange(1, 101, dtype=float)  # 1..100
    t = fit_threshold(val, 0.95)
    assert t == 95.0
    assert np.mean(val <= t) == pytest.approx(0.95)
    shuffled = np.random.default_rng(0).permutation(np.linspace(0, 1, 1000))
    assert np.mean(shuffled <= fit_threshold(shuffled)) == pytest.approx(0.95, abs=1e-3)


def test_risk_coverage_known_values() -> None:
    r = risk_coverage(
        scores=[0.4, 0.1, 0.3, 0.2],
        correct=[False, True, False, True],
        in_domain=[False, True, True, True],
        levels=(1.0, 0.5, 0.25),
    )
    assert r["n"] == 4 and r["n_in_domain"] == 3
    assert r["accuracy_all"] == 0.5
    assert r["coverage_in_domain"] == 0.75
    assert r["accuracy_in_domain"] == pytest.approx(2 / 3)
    assert [p["coverage"] for p in r["curve"]] == [1.0, 0.5, 0.25]
    assert [p["accuracy"] for p in r["curve"]] == [0.5, 1.0, 1.0]
    # Errors among the k lowest scores, k = 1..4: 0, 0, 1/3, 1/2.
    assert r["aurc"] == pytest.approx((0 + 0 + 1 / 3 + 1 / 2) / 4)
    worse = risk_coverage([0.1, 0.4, 0.2, 0.3], [False, True, False, True], [True] * 4)
    assert worse["aurc"] > r["aurc"]
    assert risk_coverage([1.0], [True], [False])["accuracy_in_domain"] is None


def test_labelled_summary_counts_non_covid_called_covid_while_in_domain() -> None:
    covid, non_covid, normal = (CLASS_NAMES.index(c) for c in ("COVID-19", "Non-COVID", "Normal"))
    onehot = np.eye(3)
    labels = [covid, non_covid, non_covid, normal, normal]
    predicted = [covid, covid, covid, covid, normal]
    passed = [True, True, False, True, True]
    group = GroupScores(
        images=[{"name": f"x{i}", "label": lab} for i, lab in enumerate(labels)],
        scores=np.array([0.1, 0.2, 0.9, 0.3, 0.4]),
        in_domain=np.array(passed),
        probabilities=onehot[predicted],
    )
    s = labelled_summary(group)
    # Of the 4 non-COVID images, 3 are called COVID-19, 2 of them in domain.
    assert s["non_covid_called_covid_in_domain_share"] == pytest.approx(2 / 4)
    assert s["accuracy_all"] == pytest.approx(2 / 5)
    assert s["in_domain_share_by_class"] == {"COVID-19": 1.0, "Non-COVID": 0.5, "Normal": 1.0}


# --- the whole benchmark with a stub score ------------------------------------------------------


def brightness_score(pixels: np.ndarray) -> Scored:
    """A stub score (mean intensity), no model: exercises every group through ``run``."""
    s = float(pixels.mean())
    return Scored(s, s <= 0.6, np.array([0.2, 0.3, 0.5]))


@needs_data
def test_run_scores_every_group_with_a_pluggable_score() -> None:
    result = run(brightness_score, DATA, limit=3, transformed_per_kind=2)
    assert set(result["groups"]) == {
        "external-dev", *ood_inputs.TRANSFORMS, "non-chest-radiographs", "ct-mr-slices",
        "photographs",
    }
    assert result["test"]["n"] == 3
    for name, g in result["groups"].items():
        assert g["n"] > 0 and 0.0 <= g["auroc_vs_test"] <= 1.0, name
    assert result["groups"]["rotated-90"]["n"] == 2
    # Intensity inversion maps the mean m to 1 - m: the stub's AUROC there follows from Test.
    test_means = [float(im.pixels.mean()) for im in ood_inputs.covid_test(DATA, 3)]
    inv_means = [1 - m for m in test_means[:2]]
    assert result["groups"]["inverted"]["auroc_vs_test"] == pytest.approx(
        auroc(test_means, inv_means), abs=1e-6
    )
    rc = result["risk_coverage"]["covid-qu-ex-test"]
    # The stub always says Normal: accuracy is the share of Normal images among the 3.
    assert rc["accuracy_all"] == pytest.approx(1 / 3)
    assert len(result["rg1"]) == 4
    assert "| photographs |" in markdown({**result, "score": "stub", "model_version": "x"})


def test_msp_threshold_is_fitted_on_val() -> None:
    # A fake classifier whose top probability is the image's mean: MSP = 1 - mean, all distinct.
    def probabilities(pixels: np.ndarray) -> np.ndarray:
        top = float(pixels.mean())
        return np.array([top, (1 - top) / 2, (1 - top) / 2])

    val = [ood_inputs.InputImage("val", f"v{i}", np.full((64, 64), 0.5 + i / 50, np.float32), 0,
                                 "synthetic") for i in range(20)]
    score_fn, threshold = msp_score_fn(probabilities, val)
    scored = [score_fn(im.pixels) for im in val]
    assert [s.ood_score for s in scored] == pytest.approx([0.5 - i / 50 for i in range(20)])
    assert sum(s.in_domain for s in scored) == 19  # 95% of 20 pass
    assert not scored[0].in_domain  # the least confident one (MSP 0.5) is the one flagged
    assert score_fn(np.full((64, 64), 0.3, np.float32)).in_domain is False


def test_model_probabilities_come_from_predict(random_checkpoint: Path) -> None:
    p = model_probabilities(load_checkpoint(random_checkpoint))(
        np.random.default_rng(0).random((64, 64), np.float32))
    assert p.shape == (len(CLASS_NAMES),) and p.sum() == pytest.approx(1.0, abs=1e-5)


def test_a_limit_spreads_over_the_list() -> None:
    assert ood_inputs._spread(list(range(10)), 3) == [0, 4, 9]  # noqa: SLF001
    assert ood_inputs._spread(list(range(3)), None) == [0, 1, 2]  # noqa: SLF001
    assert list(itertools.islice(ood_inputs.photographs(), 1))


def test_refused_dicom_falls_back_to_pydicom_with_air_dark(tmp_path: Path) -> None:
    from tests.dicom_samples import synthetic_dicom

    stored = np.array([[0, 100], [200, 300]], np.uint16).repeat(40, 0).repeat(40, 1)
    path = tmp_path / "knee.dcm"
    synthetic_dicom(stored, photometric="MONOCHROME1", body_part="KNEE", modality="CR",
                    bits_stored=12).save_as(path, enforce_file_format=True)
    pixels, how = ood_inputs.dicom_pixels(path)
    assert how == "pydicom+min-max"  # the loader refuses a knee by its header
    # MONOCHROME1: the highest stored value is the darkest (air dark, as the model expects).
    np.testing.assert_allclose(pixels[::40, ::40], [[1.0, 2 / 3], [1 / 3, 0.0]], atol=1e-6)


def test_model_score_needs_a_checkpoint_with_an_ood_reference(random_checkpoint: Path) -> None:
    score = model_score_fn(load_checkpoint(random_checkpoint))  # no calibration stored
    with pytest.raises(RuntimeError, match="no out-of-domain statistics"):
        score(np.random.default_rng(0).random((64, 64), np.float32))


def test_an_empty_group_is_summarised_not_a_crash() -> None:
    test = score_group([ood_inputs.InputImage("t", "a", np.eye(64, dtype=np.float32), 0, "x")],
                       brightness_score)
    empty = score_group([], brightness_score)
    assert group_summary(test, empty) == {
        "n": 0, "auroc_vs_test": None, "flagged_share": None, "median_score": None
    }
