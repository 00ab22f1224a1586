"""The site-adaptation benchmark runs end to end in its --limit smoke mode (three patients per
half, a few fine-tuning steps of the shipped model). Not a result: it keeps the script from
rotting and checks it goes through the app's import paths (readings and lung masks as versions)
and keeps the two halves' patients apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from covid_qu_ex import shared_data

import settings
from benchmarks import site_adaptation
from database import annotation_versions, reading_versions
from database.session import init_db, session_scope

EXTERNAL = settings.REPO_ROOT.parent / "shared" / "data" / "external-dev"


def test_split_is_by_patient_and_seeded() -> None:
    rows = [{"patient": str(i // 2), "file": f"{i}.png"} for i in range(20)]
    one, two = site_adaptation.split_patients(rows, seed=0)
    assert not set(one) & set(two) and len(one) + len(two) == 10
    assert site_adaptation.split_patients(rows, seed=0) == (one, two)
    assert site_adaptation.split_patients(rows, seed=1) != (one, two)
    assert site_adaptation.step_counts("10,25,50,all", 41) == [10, 25, 41]


def test_limit_run_imports_through_the_app_and_scores_every_model(tmp_path: Path) -> None:
    data = shared_data()
    if not (EXTERNAL / "labels.csv").is_file():
        if settings.require_data():
            pytest.fail(f"INFMAP_REQUIRE_DATA=1 but {EXTERNAL} is missing")
        pytest.skip(f"{EXTERNAL} is missing")
    args = site_adaptation.parse_args(["--limit", "3", "--data", str(data), "--external",
                                       str(EXTERNAL), "--threads", "1",
                                       "--work-dir", str(tmp_path)])
    result = site_adaptation.run(args)
    assert result["smoke_test"] and result["steps"][-1]["patients"] == 3
    assert all(s["images"] >= 2 for s in result["steps"])
    written = json.loads((tmp_path / "limit" / "site_adaptation.json").read_text())
    assert written["test"]["patients"] == 3
    for row in [result["base"], *result["steps"]]:
        site = row["scores"]["site"]
        assert site["n_images"] == result["test"]["images"]
        assert 0.0 <= site["accuracy"] <= 1.0 and 0.0 <= site["ece"] <= 1.0
        assert row["scores"]["val"]["n_images"] == 8
    engine = init_db(f"sqlite:///{tmp_path / 'limit' / 'site.sqlite'}")
    with session_scope(engine, write=False) as s:
        readings = reading_versions.training_readings(s)
        masks = annotation_versions.training_annotations(s)
    engine.dispose()
    assert len(readings) == result["steps"][-1]["images"]  # every taught image has its reading
    assert {m.kind for m in masks} <= {"lung"}
    assert len(masks) == sum(s["lung_masks_saved"] for s in result["steps"])
