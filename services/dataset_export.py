"""The corrected dataset as files: a ZIP in the COVID-QU-Ex folder layout, a CSV manifest and a
README, so ``training.train`` / ``training.evaluate`` (and anyone's COVID-QU-Ex reader) read it
as they read the public set.

    python -m services.dataset_export --out DIR [--include-submitted] [--split hash|Train|Val|Test]

Layout inside the ZIP (``training.data``):
    Infection Segmentation Data/Infection Segmentation Data/<split>/<class>/images/<f>.png
    Infection Segmentation Data/Lung Masks/<split>/<class>/lung masks/<f>.png
    Infection Segmentation Data/Infection Masks/<split>/<class>/infection masks/<f>.png
    manifest.csv, README.md

A study goes out when both of its masks have an approved (or, by choice, submitted) human
version. Its class folder is the reading's label when the reading is one of the three classes,
else the active model's predicted class (the manifest says which). Splits are stable: a study's
split comes from the salted hash of its patient (else of the study), so a patient's studies stay
in one split and re-exports never move a study. File names carry no patient data. The queries are
``database.export``; this module decodes the payloads and writes the files.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import sys
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np

from database import export as export_queries
from database import images, users
from inference.storage import xray_from_npz_bytes
from services.identity import EXPORTERS
from services.ingest import SessionFactory
from settings import READING_CLASSES

SUBSET = "Infection Segmentation Data"
SPLITS = ("Train", "Val", "Test")
MASK_FOLDERS = {"lung": ("Lung Masks", "lung masks"), "infection": ("Infection Masks",
                                                                    "infection masks")}
MANIFEST_COLUMNS = (
    "file", "split", "class", "class_source", "study_id", "image_sha256", "patient_hash",
    "source_format", "width", "height",
    "reading", "reading_status", "reading_version", "reading_author", "reading_time",
    "lung_version", "lung_status", "lung_author", "lung_time", "lung_drawn_on_model",
    "infection_version", "infection_status", "infection_author", "infection_time",
    "infection_drawn_on_model",
    "model_version", "model_class",
    "image_png_sha256", "lung_png_sha256", "infection_png_sha256",
)


@dataclass(frozen=True)
class ExportOptions:
    include_submitted: bool = False
    split: str = "hash"  # hash | Train | Val | Test
    val_percent: int = 10  # with split=hash
    test_percent: int = 10

    def __post_init__(self) -> None:
        if self.split not in ("hash", *SPLITS):
            raise ValueError(f"split must be hash or one of {', '.join(SPLITS)}")
        percents = (self.val_percent, self.test_percent)
        if min(percents) < 0 or sum(percents) > 100:
            raise ValueError("val and test percentages must be >= 0 and add up to at most 100")


@dataclass
class ExportSummary:
    written: Counter[tuple[str, str]] = field(default_factory=Counter)  # (split, class) -> n
    left_out: Counter[str] = field(default_factory=Counter)  # reason -> n

    @property
    def total(self) -> int:
        return sum(self.written.values())


def split_for(key: str, options: ExportOptions) -> str:
    """A stable split for a patient (or study) key: the same key always gets the same split."""
    if options.split != "hash":
        return options.split
    bucket = int(hashlib.sha256(f"infmap-split\x00{key}".encode()).hexdigest()[:8], 16) % 100
    if bucket < options.val_percent:
        return "Val"
    if bucket < options.val_percent + options.test_percent:
        return "Test"
    return "Train"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _image_png(payload: bytes) -> bytes:
    pixels = xray_from_npz_bytes(payload).pixels
    gray = np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)
    ok, buf = cv2.imencode(".png", gray)
    if not ok:  # pragma: no cover - OpenCV fails only on impossible shapes
        raise ValueError("could not encode the image as PNG")
    return buf.tobytes()


def _class_of(study: export_queries.ExportStudy) -> tuple[str | None, str]:
    if study.reading is not None:
        if study.reading.label in READING_CLASSES:
            return study.reading.label, "reading"
        return None, f"reading is '{study.reading.label}' (not one of the three classes)"
    if study.model_class is not None:
        return study.model_class, "model"
    return None, "no reading and no prediction of the active model"


def _time(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _manifest_row(
    study: export_queries.ExportStudy, name: str, split: str, cls: str, source: str,
    image_png: bytes,
) -> dict[str, object]:
    r = study.reading
    row: dict[str, object] = {
        "file": name, "split": split, "class": cls, "class_source": source,
        "study_id": study.image_id, "image_sha256": study.sha256,
        "patient_hash": study.patient_hash or "", "source_format": study.source_format or "",
        "width": study.width, "height": study.height,
        "reading": r.label if r else "", "reading_status": r.status if r else "",
        "reading_version": r.version_id if r else "",
        "reading_author": f"{r.author} ({r.author_role})" if r else "",
        "reading_time": _time(r.created) if r else "",
        "model_version": study.model_version or "", "model_class": study.model_class or "",
        "image_png_sha256": _sha(image_png),
    }
    for kind, m in study.masks.items():
        row |= {
            f"{kind}_version": m.version_id, f"{kind}_status": m.status,
            f"{kind}_author": m.author, f"{kind}_time": _time(m.created),
            f"{kind}_drawn_on_model": m.model_version or "", f"{kind}_png_sha256": _sha(m.mask_png),
        }
    return row


def _readme(summary: ExportSummary, options: ExportOptions, when: datetime) -> str:
    lines = [
        "# InfMap dataset export",
        "",
        f"Exported {_time(when)}: {summary.total} studies with "
        + ("approved or submitted" if options.include_submitted else "approved")
        + " lung and infection masks, in the COVID-QU-Ex folder layout",
        f"(`{SUBSET}/...`; read it with any COVID-QU-Ex reader, e.g. InfMap's `training.data`).",
        "",
        "- Images: the de-identified stored image as 8-bit PNG (air dark), at its own size.",
        "- Masks: 0/255 PNG on the image grid, exactly as saved in InfMap.",
        "- Class folder: the study's reading when it is COVID-19, Non-COVID or Normal; otherwise "
        "the active model's predicted class (`class_source` in manifest.csv says which).",
        "- Split: "
        + (
            f"stable, from the hash of the patient (else the study): {options.val_percent} % Val, "
            f"{options.test_percent} % Test, the rest Train; one patient never spans two splits."
            if options.split == "hash"
            else f"every study in {options.split}."
        ),
        "- manifest.csv: per file the study, reading (label, status, version, author, time), the "
        "mask versions with status, author, time and the model they were drawn on, the active "
        "model's version and class, and the sha256 of every file written. Free-text findings "
        "and file names given at upload are not exported (they may identify a patient).",
        "",
        "| split | class | studies |",
        "|---|---|---|",
    ]
    lines += [f"| {s} | {c} | {n} |" for (s, c), n in sorted(summary.written.items())]
    if summary.left_out:
        lines += ["", "Left out:", ""]
        lines += [f"- {n} studies: {reason}" for reason, n in sorted(summary.left_out.items())]
    lines += [
        "",
        "Decision support only: masks and labels were made with an AI model's help and are not "
        "a diagnosis.",
    ]
    return "\n".join(lines) + "\n"


def write_dataset_zip(
    scope: SessionFactory, target: BinaryIO, options: ExportOptions | None = None
) -> ExportSummary:
    """Write the export as a ZIP to ``target``; the summary says what went where."""
    options = options or ExportOptions()
    with scope(write=False) as session:
        studies = export_queries.export_studies(session, options.include_submitted)
    summary = ExportSummary()
    manifest = io.StringIO()
    writer = csv.DictWriter(manifest, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for study in studies:
            missing = [k for k in MASK_FOLDERS if k not in study.masks]
            if missing:
                summary.left_out[f"no exportable {' or '.join(missing)} mask"] += 1
                continue
            cls, source = _class_of(study)
            if cls is None:
                summary.left_out[source] += 1
                continue
            with scope(write=False) as session:
                image = images.get_image(session, study.image_id)
                assert image is not None
                png = _image_png(images.read_image_payload(image))
            split = split_for(study.patient_hash or study.sha256, options)
            name = f"infmap_{study.image_id}_{study.sha256[:8]}.png"
            zf.writestr(f"{SUBSET}/{SUBSET}/{split}/{cls}/images/{name}", png)
            for kind, (outer, inner) in MASK_FOLDERS.items():
                zf.writestr(f"{SUBSET}/{outer}/{split}/{cls}/{inner}/{name}",
                            study.masks[kind].mask_png)
            writer.writerow(_manifest_row(study, name, split, cls, source, png))
            summary.written[(split, cls)] += 1
        zf.writestr("manifest.csv", manifest.getvalue())
        zf.writestr("README.md", _readme(summary, options, datetime.now(UTC)))
    return summary


def dataset_zip(
    scope: SessionFactory, user_id: int, options: ExportOptions | None = None
) -> tuple[str, bytes, ExportSummary]:
    """The export in memory for a download: (file name, ZIP bytes, summary), for radiologists,
    researchers and admins (``RoleError`` otherwise; the command line is the server operator's)."""
    with scope(write=False) as s:
        users.acting_user(s, user_id, EXPORTERS, "export the dataset")
    buffer = io.BytesIO()
    summary = write_dataset_zip(scope, buffer, options)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"infmap-export-{stamp}.zip", buffer.getvalue(), summary


def export_to_folder(
    scope: SessionFactory, out_dir: Path, options: ExportOptions | None = None
) -> tuple[Path, ExportSummary]:
    """Write ``<out_dir>/infmap-export-<UTC time>.zip``; a failed export leaves no ZIP behind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"infmap-export-{stamp}.zip"
    partial = path.with_suffix(".zip.partial")
    try:
        with open(partial, "wb") as fh:
            summary = write_dataset_zip(scope, fh, options)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path, summary


def main(argv: Sequence[str] | None = None) -> int:
    import settings
    from services.storage import open_store

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for the ZIP")
    p.add_argument("--db", default=None, help="database URL (default: DATABASE_URL / the app's)")
    p.add_argument("--include-submitted", action="store_true",
                   help="also studies whose masks are submitted but not yet approved")
    p.add_argument("--split", default="hash", choices=("hash", *SPLITS),
                   help="hash: stable per patient; or put every study in one split")
    p.add_argument("--val-percent", type=int, default=10)
    p.add_argument("--test-percent", type=int, default=10)
    args = p.parse_args(argv)
    try:
        options = ExportOptions(args.include_submitted, args.split, args.val_percent,
                                args.test_percent)
    except ValueError as exc:
        p.error(str(exc))
    store = open_store(args.db or settings.database_url())
    path, summary = export_to_folder(store.scope, args.out, options)
    print(f"{path}: {summary.total} studies", file=sys.stdout)
    for (split, cls), n in sorted(summary.written.items()):
        print(f"  {split}/{cls}: {n}")
    for reason, n in sorted(summary.left_out.items()):
        print(f"  left out {n}: {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
