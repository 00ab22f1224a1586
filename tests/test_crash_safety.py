"""Crash safety (issue 15.6): writer processes save on one SQLite file, one is killed with
SIGKILL inside a save; the file stays whole and every acknowledged save is there, whole. Two
short rounds of ``benchmarks.crash_safety``; the long run's counts are in the README."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from benchmarks import crash_safety
from database.session import make_engine


def test_a_killed_writer_leaves_every_acknowledged_save_and_no_half_version() -> None:
    summary = crash_safety.run(rounds=2, writers=3, saves=8, seed=3)
    assert summary["kills_while_saving"] == 2
    assert summary["acknowledged"] >= 2 * 2 * 8  # the two writers not killed, at least
    assert summary["integrity_ok"] == 2
    assert (summary["missing"], summary["wrong_mask"], summary["half_versions"]) == (0, 0, 0)
    assert summary["rounds_ok"] == 2


def test_the_check_sees_a_missing_a_changed_and_a_broken_version(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'check.sqlite'}"
    image_ids, user_ids = crash_safety.set_up(url, writers=1)
    crash_safety.writer(url, user_ids[0], image_ids, saves=3, seed=5)  # versions 1, 2, 3
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE annotation_versions SET mask_png = x'00ff' WHERE id = 3"))
    engine.dispose()
    acknowledged = {1: "0" * 64, 2: None, 9: "f" * 64}  # 1: another mask; 9: never saved
    result = crash_safety.Round()
    crash_safety.check(url, {k: v for k, v in acknowledged.items() if v}, result)
    assert result.integrity == "ok"
    assert result.missing == [9] and result.wrong_mask == [1] and result.half == [3]
    assert not result.ok
