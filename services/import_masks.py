"""Import existing X-rays and their masks as annotation versions.

    python -m services.import_masks --images DIR --lung-masks DIR --infection-masks DIR \\
        --author NAME [--status submitted|approved|draft] [--role annotator|radiologist] \\
        [--database-url URL] [--verbose]

Images are found recursively and matched to masks by file stem (``a.png`` <-> ``a.png``; when a
stem occurs more than once, the mask whose folders share the most names with the image's wins,
e.g. ``Train/COVID-19``). Images load through ``inference.isolation.load_xray_isolated`` (a
worker process with a time and memory budget per file) and are stored by
``services.ingest.store_xray(source="import")``; files (or symlinks) resolving outside the given
folders are never read. Masks (0/255 PNGs) become annotation versions by ``--author``, resized
with nearest neighbour when their size differs from the image's. Running it again is a no-op: a
mask equal to the current head of (image, kind) is not saved again. Each image is its own
transaction.

Nothing given is dropped in silence: a file it could not read (a broken link, a link out of its
folder, an unreadable image or mask) or match (an image without its mask, a mask matched to no
image) is counted and named (its path relative to the folder given; other file names only with
``--verbose``), and the command exits with status 1 when it was given files but imported none.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import Engine

from database import annotation_versions, audit, users, versioning
from database.masks import MaskError, read_mask_file, resize_mask
from database.models import ANNOTATION_STATUSES, REVIEW_STATUSES
from database.session import init_db, session_scope
from inference.checks import UnsupportedImage
from inference.isolation import load_xray_isolated
from services.ingest import store_xray
from settings import IMAGE_SUFFIXES, MASK_FILE_SUFFIXES, ROLES, cli_path

# Extension-less files are DICOM too (archives often drop the suffix).
IMPORT_SUFFIXES = {*IMAGE_SUFFIXES, ""}
MASK_SUFFIXES = set(MASK_FILE_SUFFIXES)


@dataclass
class ImportSummary:
    images_new: int = 0
    images_present: int = 0
    versions_saved: int = 0
    versions_unchanged: int = 0
    masks_resized: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    resized_files: list[str] = field(default_factory=list)
    unmatched_masks: list[str] = field(default_factory=list)  # matched to no image

    @property
    def imported(self) -> bool:
        """At least one image was stored or found already stored."""
        return self.images_new + self.images_present > 0

    def skip(self, relative: str, reason: str) -> None:
        self.skipped[reason] += 1
        self.skipped_files.append((relative, reason))

    def lines(self, verbose: bool = False) -> list[str]:
        out = [
            f"Images: {self.images_new} imported, {self.images_present} already present, "
            f"{sum(self.skipped.values())} skipped.",
            f"Mask versions: {self.versions_saved} saved, "
            f"{self.versions_unchanged} already present (equal to the current version).",
        ]
        if self.masks_resized:
            out.append(
                f"Resized {self.masks_resized} mask(s) to their image's size "
                "(nearest neighbour): the mask and image sizes differed."
            )
            if verbose:
                out += [f"  resized: {name}" for name in self.resized_files]
        for reason, n in sorted(self.skipped.items()):
            out.append(f"Skipped {n}: {reason}")
        # Every file not imported is named: an operator must be able to find and fix it.
        out += [f"  skipped: {name} ({reason})" for name, reason in self.skipped_files]
        if self.unmatched_masks:
            out.append(f"Masks matched to no image: {len(self.unmatched_masks)}")
            out += [f"  unmatched: {name}" for name in self.unmatched_masks]
        if not self.imported:
            out.append("Nothing imported.")
        return out


def _files(root: Path, suffixes: set[str], refused: list[tuple[str, str]]) -> list[Path]:
    """Readable files under ``root`` with these suffixes. A broken link, or a link resolving
    outside ``root`` (a folder handed to the importer must not become a way to read files
    elsewhere), is appended to ``refused`` as (path relative to root, reason), never dropped."""
    inside = root.resolve()
    found: list[Path] = []
    for p in sorted(root.rglob("*")):
        if p.name.startswith(".") or p.suffix.lower() not in suffixes or p.is_dir():
            continue
        relative = str(p.relative_to(root))
        if not p.exists():
            refused.append((relative, "unreadable: a link to a file that does not exist"))
        elif not p.resolve().is_relative_to(inside):
            refused.append((relative, "refused: a link to a file outside the folder given"))
        elif p.is_file():
            found.append(p)
    return found


def _index(root: Path, refused: list[tuple[str, str]]) -> dict[str, list[Path]]:
    index: dict[str, list[Path]] = {}
    for path in _files(root, MASK_SUFFIXES, refused):
        index.setdefault(path.stem, []).append(path)
    return index


def _match(image_rel: Path, candidates: list[Path], root: Path) -> Path | None:
    """The candidate whose folder names overlap most with the image's; None if tied."""
    if len(candidates) == 1:
        return candidates[0]
    folders = set(image_rel.parent.parts)
    scored = sorted(
        ((len(folders & set(c.relative_to(root).parent.parts)), c) for c in candidates),
        key=lambda sc: -sc[0],
    )
    if scored[0][0] == scored[1][0]:
        return None
    return scored[0][1]


def import_masks(
    engine: Engine,
    images_dir: Path,
    lung_dir: Path | None,
    infection_dir: Path | None,
    author_name: str,
    status: str = "submitted",
    role: str = "annotator",
) -> ImportSummary:
    if lung_dir is None and infection_dir is None:
        raise ValueError("give at least one of the lung or infection mask folders")
    if status in REVIEW_STATUSES and role != "radiologist":
        raise versioning.RoleError(f"only a radiologist may import masks as {status}")
    mask_dirs = {k: d for k, d in (("lung", lung_dir), ("infection", infection_dir)) if d}
    summary = ImportSummary()
    refused_masks: dict[str, list[tuple[str, str]]] = {kind: [] for kind in mask_dirs}
    indexes = {kind: _index(d, refused_masks[kind]) for kind, d in mask_dirs.items()}
    for kind, refused in refused_masks.items():
        for relative_mask, reason in refused:
            summary.skip(f"{kind} mask {relative_mask}", reason)
    with session_scope(engine) as s:
        author = users.get_or_create_user(s, author_name, role)

    refused_images: list[tuple[str, str]] = []
    image_files = _files(images_dir, IMPORT_SUFFIXES, refused_images)
    for relative_image, reason in refused_images:
        summary.skip(relative_image, reason)
    image_stems = {p.stem for p in image_files} | {Path(r).stem for r, _ in refused_images}
    for kind, index in indexes.items():
        for stem in sorted(set(index) - image_stems):
            summary.unmatched_masks += [
                f"{kind} mask {p.relative_to(mask_dirs[kind])}" for p in index[stem]
            ]
    for path in image_files:
        relative = path.relative_to(images_dir)
        masks: dict[str, Path] = {}
        for kind, index in indexes.items():
            candidates = index.get(path.stem, [])
            found = _match(relative, candidates, mask_dirs[kind]) if candidates else None
            if found is None:
                problem = "ambiguous" if candidates else "missing"
                summary.skip(str(relative), f"{problem} {kind} mask")
                break
            masks[kind] = found
        else:
            try:
                xray = load_xray_isolated(path)
            except UnsupportedImage as exc:
                summary.skip(str(relative), f"not a usable X-ray ({exc})")
                continue
            height, width = xray.pixels.shape[:2]
            arrays: dict[str, np.ndarray] = {}
            try:
                for kind, mask_path in masks.items():
                    mask = read_mask_file(str(mask_path))
                    if mask.shape != (height, width):
                        mask = resize_mask(mask, height, width)
                        summary.masks_resized += 1
                        summary.resized_files.append(str(mask_path.relative_to(mask_dirs[kind])))
                    arrays[kind] = mask
            except (MaskError, OSError):
                summary.skip(str(relative), "unreadable mask")
                continue
            with session_scope(engine) as s:
                image, created = store_xray(s, xray, xray.source_name, source="import")
                if created:
                    summary.images_new += 1
                else:
                    summary.images_present += 1
                for kind, mask in arrays.items():
                    head = annotation_versions.head_version(s, image.id, kind)
                    same = head is not None and np.array_equal(
                        annotation_versions.version_mask(head), mask
                    )
                    if same:
                        summary.versions_unchanged += 1
                        continue
                    annotation_versions.save_annotation(
                        s,
                        image.id,
                        kind,
                        mask,
                        author,
                        status,
                        head.id if head is not None else None,
                        comment="imported",
                    )
                    summary.versions_saved += 1
    with session_scope(engine) as s:
        audit.record(s, "import", users.get_user(s, author_name), detail=(
            f"masks: {summary.images_new} images new, {summary.images_present} present, "
            f"{summary.versions_saved} versions saved as {status}, "
            f"{sum(summary.skipped.values())} skipped"))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.import_masks",
        description="Import X-rays with existing lung/infection masks as annotation versions.",
    )
    parser.add_argument("--images", type=cli_path, required=True,
                        help="folder of X-rays (recursive)")
    parser.add_argument("--lung-masks", type=cli_path, help="folder of lung masks (0/255 PNG)")
    parser.add_argument("--infection-masks", type=cli_path, help="folder of infection masks")
    parser.add_argument("--author", required=True, help="user name the versions are saved as")
    parser.add_argument("--status", default="submitted", choices=ANNOTATION_STATUSES)
    parser.add_argument("--role", default="annotator", choices=ROLES)
    parser.add_argument("--database-url", help="default: DATABASE_URL or data/infmap.sqlite")
    parser.add_argument("--verbose", action="store_true", help="list skipped and resized files")
    args = parser.parse_args(argv)

    for option, folder in (
        ("--images", args.images),
        ("--lung-masks", args.lung_masks),
        ("--infection-masks", args.infection_masks),
    ):
        if folder is not None and not folder.is_dir():
            parser.error(f"{option}: {folder} is not a folder")
    if args.lung_masks is None and args.infection_masks is None:
        parser.error("give --lung-masks and/or --infection-masks")
    if args.status in REVIEW_STATUSES and args.role != "radiologist":
        parser.error(f"--status {args.status} needs --role radiologist")

    engine = init_db(args.database_url)
    try:
        summary = import_masks(
            engine,
            args.images,
            args.lung_masks,
            args.infection_masks,
            args.author,
            args.status,
            args.role,
        )
    except (ValueError, PermissionError) as exc:  # e.g. the author exists with another role
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    print("\n".join(summary.lines(args.verbose)))
    return 0 if summary.imported else 1


if __name__ == "__main__":
    raise SystemExit(main())
