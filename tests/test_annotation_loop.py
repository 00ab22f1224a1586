"""The annotation-loop benchmark runs end to end (its --tiny smoke mode: small model, a few steps).

Not a result (the README's table comes from the full run); this keeps the script from rotting
and checks the loop goes through the app's own paths: corrections imported as annotation
versions, fine-tuned versions registered with their lineage.
"""

from __future__ import annotations

import json
from pathlib import Path

from covid_qu_ex import shared_data

from benchmarks import annotation_loop
from database import annotation_versions, model_versions
from database.session import init_db, session_scope


def test_tiny_annotation_loop_registers_versions_with_lineage(tmp_path: Path) -> None:
    data = shared_data()  # the benchmark draws its corrections from the real Train split
    args = annotation_loop.parse_args([
        "--tiny", "--data", str(data), "--base-steps", "3", "--corrections", "5,10",
        "--work-dir", str(tmp_path), "--out-dir", str(tmp_path / "out"), "--cache-dir", "",
    ])
    result = annotation_loop.run(args)

    assert [s["corrections"] for s in result["steps"]] == [5, 10]
    written = json.loads((tmp_path / "tiny" / "annotation_loop_tiny.json").read_text())
    assert written["steps"][1]["trained_on"] + written["steps"][1]["held_aside"] == 10
    for step in result["steps"]:
        assert 0.0 <= step["heldout"]["infection_dice_covid"] <= 1.0
        assert 0.0 <= step["heldout"]["lung_dice"] <= 1.0

    engine = init_db(f"sqlite:///{tmp_path / 'tiny' / 'annotation_loop.sqlite'}")
    with session_scope(engine, write=False) as s:
        versions = {v.version: v for v in model_versions.list_model_versions(s)}
        assert {"no-covid-base", "oracle-5", "oracle-10"} <= set(versions)
        lineage = versions["oracle-10"].lineage
        assert lineage["source"] == "finetune"
        last = result["steps"][1]
        # lung + infection version of each study trained on; held-aside studies listed apart
        assert len(lineage["annotation_version_ids"]) == 2 * last["trained_on"]
        assert len(lineage["held_aside_image_ids"]) == last["held_aside"] >= 1
        assert len(annotation_versions.training_annotations(s)) == 2 * 10
    engine.dispose()
