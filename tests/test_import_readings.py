"""``python -m services.import_readings`` on the bundled samples (real COVID-QU-Ex images) and a
``file,label`` CSV: labels matched case-insensitively, all rows or nothing, a rerun is a no-op."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from covid_qu_ex import sample_cases
from db_helpers import count

import settings
from database import reading_versions
from database.models import Image, ReadingVersion
from database.session import init_db, session_scope
from services.import_readings import ReadingImportError, import_readings, main, match_label

CASES = sample_cases()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """The samples as ``<class>/<stem>.png`` plus a file that is not an X-ray."""
    root = tmp_path / "images"
    for cls, stem in CASES:
        (root / cls).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(settings.SAMPLES_DIR / cls / f"{stem}.png", root / cls / f"{stem}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    return root


def _csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_match_label_is_case_insensitive_and_knows_the_shown_names() -> None:
    assert match_label("covid-19") == "COVID-19"
    assert match_label(" NON-COVID ") == "Non-COVID"
    assert match_label("Non-COVID  pneumonia") == "Non-COVID"
    assert match_label("Not Assessable") == "not assessable"
    assert match_label("Other finding") == "other finding"
    assert match_label("pneumonia") is None


def test_import_saves_readings_and_rerun_is_a_noop(folder: Path, tmp_path: Path) -> None:
    engine = init_db(f"sqlite:///{tmp_path / 'db' / 'infmap.sqlite'}")
    (cls0, stem0), (cls1, stem1) = CASES[0], CASES[-1]
    csv_path = _csv(tmp_path / "labels.csv", [
        "file,label,patient,finding",
        f"{cls0}/{stem0}.png,{cls0.lower()},7,bilateral opacities",
        f"{cls1}/{stem1}.png,{cls1.upper()},8,",
        f"{cls1}/{stem1}.png,{cls1},8,",  # the same reading twice counts once
    ])
    summary = import_readings(engine, csv_path, folder, "rad", "approved", "radiologist")
    assert summary.imported and summary.rows == 3
    assert (summary.images_new, summary.readings_saved) == (2, 2)
    with session_scope(engine, write=False) as s:
        current = reading_versions.current_readings(s)
        got = sorted((v.label, v.finding, v.status, v.author.name, v.image.source)
                     for v in current.values())
    assert got == sorted([(cls0, "bilateral opacities", "approved", "rad", "import"),
                          (cls1, None, "approved", "rad", "import")])
    again = import_readings(engine, csv_path, folder, "rad", "approved", "radiologist")
    assert (again.images_present, again.readings_saved, again.readings_unchanged) == (2, 0, 2)
    assert count(engine, ReadingVersion) == 2
    engine.dispose()


def test_bad_rows_are_reported_and_nothing_is_imported(folder: Path, tmp_path: Path) -> None:
    engine = init_db(f"sqlite:///{tmp_path / 'db' / 'infmap.sqlite'}")
    (cls0, stem0), (cls1, stem1) = CASES[0], CASES[1]
    csv_path = _csv(tmp_path / "labels.csv", [
        "file,label",
        f"{cls0}/{stem0}.png,COVID-19",  # good, but must not be imported alone
        f"{cls1}/{stem1}.png,pneumonia",  # unknown label
        "missing.png,Normal",  # no such file
        "../labels.csv,Normal",  # outside the folder
        "broken.png,Normal",  # not an X-ray
        f"{cls0}/{stem0}.png,Normal",  # listed again with another reading
    ])
    summary = import_readings(engine, csv_path, folder, "ann")
    assert not summary.imported
    reasons = {row: reason for row, _name, reason in summary.bad_rows}
    assert sorted(reasons) == [3, 4, 5, 6, 7]
    assert "unknown label 'pneumonia'" in reasons[3]
    assert "no such file" in reasons[4] and "outside" in reasons[5]
    assert "not a usable X-ray" in reasons[6] and "first on row 2" in reasons[7]
    assert count(engine, ReadingVersion) == 0 and count(engine, Image) == 0
    text = "\n".join(summary.lines())
    assert "Nothing imported: 5 of 6 rows are bad." in text and "missing.png" not in text
    assert "missing.png" in "\n".join(summary.lines(verbose=True))
    engine.dispose()


def test_cli_exit_codes_and_header_check(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'db' / 'infmap.sqlite'}"
    cls, stem = CASES[0]
    good = _csv(tmp_path / "good.csv", ["file,label", f"{cls}/{stem}.png,{cls}"])
    base = ["--images", str(folder), "--author", "ann", "--database-url", url]
    assert main(["--csv", str(good), *base]) == 0
    assert "Readings: 1 saved" in capsys.readouterr().out
    bad = _csv(tmp_path / "bad.csv", ["file,label", "missing.png,Normal"])
    assert main(["--csv", str(bad), *base]) == 1
    assert "row 2: no such file" in capsys.readouterr().err
    no_label = _csv(tmp_path / "nolabel.csv", ["file,class", f"{cls}/{stem}.png,{cls}"])
    assert main(["--csv", str(no_label), *base]) == 2
    assert "has no label column" in capsys.readouterr().err
    with pytest.raises(ReadingImportError, match="empty"):
        import_readings(init_db(url), _csv(tmp_path / "empty.csv", []), folder, "ann")
    with pytest.raises(SystemExit):  # approval needs a radiologist
        main(["--csv", str(good), *base, "--status", "approved"])
