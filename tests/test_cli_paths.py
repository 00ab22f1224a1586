"""Every command that takes paths makes them absolute as it parses them (issue 15.7): a relative
``--data ../shared/data/covid-qu-ex`` once became relative symlinks in a staging folder, which
resolved against the staging folder and imported nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

import settings
from benchmarks import annotation_loop
from training import finetune, train


def test_cli_path_is_absolute_keeps_links_and_empty_stays_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real.png").write_bytes(b"x")
    (tmp_path / "link.png").symlink_to("real.png")
    assert settings.cli_path("a/../b") == tmp_path / "b"
    assert settings.cli_path("link.png") == tmp_path / "link.png"  # not the link's target
    assert settings.cli_path_str("") == ""


def test_commands_resolve_relative_paths_against_the_callers_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    bench = annotation_loop.parse_args(["--data", "../shared/data/covid-qu-ex", "--tiny"])
    assert bench.data == str(tmp_path.parent / "shared" / "data" / "covid-qu-ex")
    assert Path(bench.work_dir).is_absolute() and Path(bench.cache_dir).is_absolute()
    opts = finetune.parse_args(["--out", "new.pt", "--data", "qu-ex", "--base", "base.pt"])
    assert (opts.out, opts.data, opts.base) == (
        str(tmp_path / "new.pt"), str(tmp_path / "qu-ex"), str(tmp_path / "base.pt")
    )
    args = train.parse_args(["--data", "qu-ex"])
    assert args.data == str(tmp_path / "qu-ex") and Path(args.out).is_absolute()
