"""benchmarks.load_test in miniature on both backends (conftest's ``database_url``): not a
figure (the README's come from the full run), but the load is real and concurrent, and what the
annotators were told must be what the database holds."""

from __future__ import annotations

from benchmarks import load_test


def test_annotators_at_once_lose_nothing(database_url: str) -> None:
    args = load_test.parse_args(["--annotators", "3", "--seconds", "1.5", "--studies", "1",
                                 "--think-ms", "30", "--size", "64", "--out", ""])
    run = load_test.run_load(database_url, args, 3)

    assert run["errors"] == 0, run["error_examples"]
    assert run["saves"] == run["accepted"] + run["refused_kept_as_draft"] > 0
    # Three annotators on two masks of one study, drawing 0-60 ms: heads go stale.
    assert run["refused_kept_as_draft"] > 0
    history = run["history"]
    assert history == {"accepted_in_db": run["accepted"],
                       "drafts_in_db": run["refused_kept_as_draft"], "lost": 0,
                       "unreported": 0, "broken_chain_links": 0}
    assert run["p50_ms"] <= run["p95_ms"] <= run["max_ms"]


def test_history_check_sees_a_lost_save(engine) -> None:
    told = load_test.Tally(accepted_ids=[123456789])
    assert load_test._check_history(engine, told)["lost"] == 1
