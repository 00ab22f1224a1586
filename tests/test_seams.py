"""The seams the next issues plug into: next-study strategies, image sources, the gate."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import settings
from database import images
from database.session import init_db, session_scope
from database.worklist import WorklistRow
from services import next_study
from services.datastore import FolderSource, UploadSource, ingest_source
from training.gate import ActivationGate, ForgettingGate, decide

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def row(
    image_id: int,
    status: str = "new",
    uncertainty: float | None = None,
    minutes: int = 0,
    out_of_domain: float | None = None,
) -> WorklistRow:
    return WorklistRow(
        image_id=image_id,
        sha256="0" * 64,
        display_name=f"s{image_id}",
        source="upload",
        created=T0 + timedelta(minutes=minutes),
        prediction_id=None,
        predicted_class=None,
        confidence=None,
        infection_percent=None,
        severity=None,
        severity_score=None,
        uncertainty=uncertainty,
        status=status,
        last_author=None,
        last_touched=None,
        out_of_domain=out_of_domain,
    )


ROWS = [
    row(1, "new", 0.2, minutes=5),
    row(2, "new", None, minutes=1),
    row(3, "new", 0.7, minutes=9),
    row(4, "submitted", None, minutes=8),
    row(5, "submitted", None, minutes=2),
    row(6, "approved", 0.9),
]


def test_most_uncertain_new_first_missing_values_last() -> None:
    pick = next_study.MostUncertain()
    assert pick.choose(ROWS).image_id == 3
    assert pick.choose(ROWS, exclude=[3]).image_id == 1
    assert pick.choose(ROWS, exclude=[3, 1]).image_id == 2  # no uncertainty: last, not never
    assert pick.choose(ROWS, exclude=[1, 2, 3]) is None


def test_review_queue_is_oldest_submission_first() -> None:
    assert next_study.ReviewQueue().choose(ROWS).image_id == 5
    assert next_study.ReviewQueue("approved").choose(ROWS).image_id == 6


def test_default_chain_falls_through_to_the_review_queue() -> None:
    assert next_study.DEFAULT.choose(ROWS).image_id == 3
    assert next_study.DEFAULT.choose(ROWS, exclude=[1, 2, 3]).image_id == 5
    assert next_study.DEFAULT.choose(ROWS, exclude=[1, 2, 3, 4, 5]) is None


def test_out_of_domain_first_ranks_on_a_score_that_may_be_missing() -> None:
    ood = next_study.OutOfDomainFirst()
    assert ood.choose(ROWS) is None  # nothing scored yet: the chain's next strategy decides
    chain = next_study.First((ood, next_study.MostUncertain()))
    assert chain.choose(ROWS).image_id == 3
    scored = [*ROWS, row(7, "new", 0.1, out_of_domain=0.3), row(8, "new", 0.1, out_of_domain=0.8)]
    assert chain.choose(scored).image_id == 8


def test_folder_and_upload_sources_ingest_through_one_path(tmp_path: Path) -> None:
    folder = FolderSource(settings.SAMPLES_DIR)
    names = [item.name for item in folder.items()]
    assert len(names) == 6 and "COVID-19/covid_1579.png" in names
    assert not any("_lung" in n or "_infection" in n for n in names)  # masks are not studies

    engine = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")

    def scope(write: bool = True):  # noqa: ANN202
        return session_scope(engine, write=write)

    try:
        first = ingest_source(scope, folder, models=[])
        data = (settings.SAMPLES_DIR / "Normal" / "normal_1.png").read_bytes()
        upload = UploadSource([("mine.png", data), ("notes.txt", b"not an x-ray")])
        seen: list[tuple[int, str]] = []
        again = ingest_source(scope, upload, models=[],
                              before_each=lambda i, item: seen.append((i, item.name)))
        assert seen == [(0, "mine.png"), (1, "notes.txt")]  # the page's progress bar
        assert all(o.ok and o.created for o in first)
        assert again[0].ok and not again[0].created  # the same bytes: stored once
        assert not again[1].ok and again[1].error
        with scope(write=False) as s:
            stored = images.get_image(s, again[0].image_id)
            assert stored.source == "sample" and stored.display_name == "Normal/normal_1.png"
    finally:
        engine.dispose()


def test_forgetting_gate_is_the_shipped_rule() -> None:
    gate: ActivationGate = ForgettingGate(tolerance=0.01)
    base = {"corrections": {"score": 0.5}, "val": {"lung_dice": 0.9, "infection_dice_covid": 0.6}}
    new = {"corrections": {"score": 0.6}, "val": {"lung_dice": 0.895, "infection_dice_covid": 0.6}}
    assert gate.decide(base, new) == decide(base, new, 0.01)
    assert gate.decide(base, new)[0]
    assert not ForgettingGate(tolerance=0.001).decide(base, new)[0]
    assert "tolerance" in gate.rule


@pytest.mark.parametrize(
    "strategy",
    [
        next_study.MostUncertain(),
        next_study.ReviewQueue(),
        next_study.OutOfDomainFirst(),
        next_study.DEFAULT,
    ],
)
def test_strategies_follow_the_protocol(strategy: next_study.NextStudyStrategy) -> None:
    assert strategy.choose([]) is None


def test_val_metrics_without_a_covid_image_has_no_infection_dice() -> None:
    """A seeded Val subset can hold no COVID-19 image (a small --val-size): the infection Dice
    over COVID-19 images is then None, not a crash."""
    import numpy as np
    import torch

    from inference.model import CLASS_NAMES, LoadedModel, ModelConfig, build_model
    from training.data import SplitArrays
    from training.gate import val_metrics

    config = ModelConfig(input_size=64, decoder_channels=[16, 8, 8, 8, 8])
    torch.manual_seed(0)
    model = LoadedModel(model=build_model(config).eval(), config=config, meta={}, path=None,
                        sha256=None)
    n = 2
    val = SplitArrays(
        images=np.full((n, 64, 64), 128, np.uint8),
        lungs=np.ones((n, 64, 64), np.uint8),
        infections=np.zeros((n, 64, 64), np.uint8),
        labels=np.full(n, CLASS_NAMES.index("Normal"), np.int64),
        names=["a.png", "b.png"],
    )
    m = val_metrics(model, val)
    assert m["n_covid"] == 0 and m["infection_dice_covid"] is None
    assert 0.0 <= m["lung_dice"] <= 1.0
