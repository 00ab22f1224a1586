"""Fuzzed uploads (issue 15.5): mutated real PNG / JPEG / DICOM files through the upload path
(``load_xray_isolated``) end in an ``XRay`` or ``UnsupportedImage``, never another exception,
within the decode budget. A small fixed-seed batch of ``benchmarks.fuzz_loader`` and a
hypothesis property over the same seeds and mutations; the long run's counts are in the README."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks import fuzz_loader

BUDGET_S = 20.0  # a hang ends here as UnsupportedImage; the cases' times are checked below it


@pytest.fixture(autouse=True)
def _budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFMAP_DECODE_SECONDS", str(BUDGET_S))


@pytest.fixture(scope="module")
def seed_files() -> dict[str, bytes]:
    return fuzz_loader.seeds()


def test_a_fixed_seed_batch_ends_in_an_image_or_a_refusal() -> None:
    summary = fuzz_loader.run(150, seed=7).summary()
    assert summary["errors"] == 0, summary["results"]
    assert summary["cases"] == 150
    results = summary["results"]
    assert results["xray"] > 0 and results["unsupported"] > 0  # both paths were reached
    assert set(summary["by_mutation"]) >= set(fuzz_loader.MUTATIONS)
    assert summary["max_seconds"] < BUDGET_S  # nothing needed the budget's kill


@settings(derandomize=True, max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_any_mutation_of_a_real_file_is_read_or_refused(data: st.DataObject,
                                                          seed_files: dict[str, bytes]) -> None:
    name = data.draw(st.sampled_from(sorted(seed_files)), label="seed file")
    mutation = data.draw(st.sampled_from(fuzz_loader.mutations_for(name)), label="mutation")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="rng seed"))
    outcome = fuzz_loader.run_case(name, seed_files[name], mutation, rng)
    assert outcome.result in ("xray", "unsupported"), outcome


def test_the_decompression_bomb_is_refused_quickly(seed_files: dict[str, bytes]) -> None:
    outcome = fuzz_loader.run_case("png", seed_files["png:Normal"], "png_bomb",
                                   np.random.default_rng(0))
    assert outcome.result == "unsupported" and outcome.seconds < BUDGET_S


def test_the_harness_reports_any_other_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(data: bytes, name: str) -> None:
        raise KeyError("a decoder bug")

    monkeypatch.setattr(fuzz_loader, "load_xray_isolated", broken)
    assert fuzz_loader.load_outcome(b"anything") == "ERROR: KeyError"
