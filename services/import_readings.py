"""Import readings from a CSV as reading versions (the sibling of ``services.import_masks``).

    python -m services.import_readings --csv labels.csv --images DIR --author NAME \\
        [--status submitted|approved|draft] [--role annotator|radiologist] \\
        [--database-url URL] [--verbose]

The CSV has a header with at least ``file`` and ``label`` (other columns are ignored, so
external-dev's ``labels.csv`` imports as it is; an optional ``finding`` column is the free-text
finding). ``file`` is the X-ray's path relative to ``--images``. ``label`` matches one of the
reading labels case-insensitively, by its stored name or its shown name: ``COVID-19``,
``Non-COVID`` (``Non-COVID pneumonia``), ``Normal``, ``other finding``, ``not assessable``.

All or nothing: every row is checked first (known label, file present inside ``--images``, not
listed twice with different readings, a usable X-ray). If any row is bad, the bad rows are
reported (row number and reason; file names only with ``--verbose``) and nothing is imported.
Otherwise the X-rays are stored (``services.ingest.store_xray(source="import")``; a study
already present is reused) and the readings saved in ONE transaction. Running it again is a
no-op: a reading equal to the study's current head (label and finding) is not saved again.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine

import settings
from database import audit, reading_versions, users
from database.models import ANNOTATION_STATUSES, REVIEW_STATUSES
from database.session import init_db, session_scope
from database.versioning import RoleError
from inference.checks import UnsupportedImage
from inference.isolation import load_xray_isolated
from inference.loading import XRay
from services.ingest import store_xray
from services.reading_labels import LABEL_TEXT
from settings import ROLES

REQUIRED_COLUMNS = ("file", "label")
# Case-insensitive spellings of each label: the stored name and the name shown in the app.
LABEL_LOOKUP: dict[str, str] = {
    **{name.casefold(): name for name in LABEL_TEXT},
    **{text.casefold(): name for name, text in LABEL_TEXT.items()},
}


class ReadingImportError(ValueError):
    """The CSV as a whole cannot be imported (no header, missing columns, unreadable)."""


@dataclass(frozen=True)
class ReadingRow:
    row: int  # 1-based line number in the CSV (the header is line 1)
    file: str
    label: str
    finding: str | None


@dataclass
class ReadingImportSummary:
    rows: int = 0
    images_new: int = 0
    images_present: int = 0
    readings_saved: int = 0
    readings_unchanged: int = 0
    bad_rows: list[tuple[int, str, str]] = field(default_factory=list)  # (row, file, reason)

    @property
    def imported(self) -> bool:
        return not self.bad_rows

    def lines(self, verbose: bool = False) -> list[str]:
        if self.bad_rows:
            out = [f"Nothing imported: {len(self.bad_rows)} of {self.rows} rows are bad."]
            for row, name, reason in self.bad_rows:
                out.append(f"  row {row}: {reason}" + (f" ({name})" if verbose else ""))
            return out
        return [
            f"Rows: {self.rows}.",
            f"Images: {self.images_new} imported, {self.images_present} already present.",
            f"Readings: {self.readings_saved} saved, {self.readings_unchanged} already present "
            "(equal to the current reading).",
        ]


def match_label(text: str) -> str | None:
    """The stored label for a CSV value (case and surrounding spaces ignored), or None."""
    return LABEL_LOOKUP.get(" ".join(text.split()).casefold())


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None:
                raise ReadingImportError(f"{csv_path.name} is empty: expected a header row")
            names = {(n or "").strip().casefold() for n in reader.fieldnames}
            missing = [c for c in REQUIRED_COLUMNS if c not in names]
            if missing:
                raise ReadingImportError(
                    f"{csv_path.name} has no {' or '.join(missing)} column "
                    f"(header: {', '.join(reader.fieldnames)})"
                )
            return [
                {(k or "").strip().casefold(): (v or "").strip() for k, v in row.items()
                 if k is not None}
                for row in reader
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ReadingImportError(f"cannot read {csv_path.name}: {exc}") from exc


def check_rows(
    rows: list[dict[str, str]], images_dir: Path, summary: ReadingImportSummary
) -> list[ReadingRow]:
    """The rows that are well formed; each bad one is recorded in ``summary``."""
    inside = images_dir.resolve()
    good: list[ReadingRow] = []
    seen: dict[str, ReadingRow] = {}
    for n, raw in enumerate(rows, start=2):
        name, text = raw.get("file", ""), raw.get("label", "")
        finding = raw.get("finding") or None
        label = match_label(text)
        if not name:
            summary.bad_rows.append((n, name, "no file named"))
            continue
        if label is None:
            summary.bad_rows.append(
                (n, name, f"unknown label {text!r} (expected one of "
                          f"{', '.join(LABEL_TEXT.values())})")
            )
            continue
        path = (images_dir / name).resolve()
        if not path.is_relative_to(inside):
            summary.bad_rows.append((n, name, "the file lies outside the images folder"))
            continue
        if not path.is_file():
            summary.bad_rows.append((n, name, "no such file in the images folder"))
            continue
        row = ReadingRow(n, name, label, finding)
        earlier = seen.get(str(path))
        if earlier is not None:
            if (earlier.label, earlier.finding) != (label, finding):
                summary.bad_rows.append(
                    (n, name, f"listed again with another reading (first on row {earlier.row})")
                )
            continue  # the same reading twice counts once
        seen[str(path)] = row
        good.append(row)
    return good


def import_readings(
    engine: Engine,
    csv_path: Path,
    images_dir: Path,
    author_name: str,
    status: str = "submitted",
    role: str = "annotator",
) -> ReadingImportSummary:
    """Check every row, then import all of them in one transaction, or nothing (see module)."""
    if status not in ANNOTATION_STATUSES:
        raise ValueError(f"status must be one of {', '.join(ANNOTATION_STATUSES)}")
    if status in REVIEW_STATUSES and role != "radiologist":
        raise RoleError(f"only a radiologist may import readings as {status}")
    rows = read_rows(csv_path)
    summary = ReadingImportSummary(rows=len(rows))
    good = check_rows(rows, images_dir, summary)
    loaded: list[tuple[ReadingRow, XRay]] = []
    for row in good:
        try:
            loaded.append((row, load_xray_isolated(images_dir / row.file)))
        except UnsupportedImage as exc:
            summary.bad_rows.append((row.row, row.file, f"not a usable X-ray ({exc})"))
    if summary.bad_rows:
        summary.bad_rows.sort()
        return summary

    with session_scope(engine) as s:
        author = users.get_or_create_user(s, author_name, role)
        for row, xray in loaded:
            image, created = store_xray(s, xray, xray.source_name, source="import")
            if created:
                summary.images_new += 1
            else:
                summary.images_present += 1
            head = reading_versions.head_reading(s, image.id)
            if head is not None and (head.label, head.finding) == (row.label, row.finding):
                summary.readings_unchanged += 1
                continue
            reading_versions.save_reading(
                s, image.id, row.label, row.finding, author, status,
                head.id if head is not None else None, comment="imported",
            )
            summary.readings_saved += 1
        audit.record(s, "import", author, detail=(
            f"readings: {summary.images_new} images new, {summary.images_present} present, "
            f"{summary.readings_saved} saved as {status}"))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.import_readings",
        description="Import readings (file,label CSV) of X-rays as reading versions.",
    )
    parser.add_argument("--csv", type=settings.cli_path, required=True,
                        help="CSV with file,label columns")
    parser.add_argument("--images", type=settings.cli_path, required=True,
                        help="folder the CSV's file paths are relative to")
    parser.add_argument("--author", required=True, help="user name the readings are saved as")
    parser.add_argument("--status", default="submitted", choices=ANNOTATION_STATUSES)
    parser.add_argument("--role", default="annotator", choices=ROLES)
    parser.add_argument("--database-url", help="default: DATABASE_URL or data/infmap.sqlite")
    parser.add_argument("--verbose", action="store_true", help="name the files of bad rows")
    args = parser.parse_args(argv)
    if not args.csv.is_file():
        parser.error(f"--csv: {args.csv} is not a file")
    if not args.images.is_dir():
        parser.error(f"--images: {args.images} is not a folder")
    if args.status in REVIEW_STATUSES and args.role != "radiologist":
        parser.error(f"--status {args.status} needs --role radiologist")

    engine = init_db(args.database_url)
    try:
        summary = import_readings(
            engine, args.csv, args.images, args.author, args.status, args.role
        )
    except (ValueError, PermissionError) as exc:  # a bad CSV; the author exists with another role
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    print("\n".join(summary.lines(args.verbose)), file=sys.stdout if summary.imported
          else sys.stderr)
    return 0 if summary.imported else 1


if __name__ == "__main__":
    raise SystemExit(main())
