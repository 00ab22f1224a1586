"""Labelled sets to evaluate on, in memory on the network's grid: the one reader behind
``python -m training.evaluate`` and the app's Evaluation page.

Three folder layouts (``detect_layout``):

* ``covid-qu-ex``: the dataset's own Kaggle layout (``training.data``), one split;
* ``labels-csv``: ``labels.csv`` (``file,label[,has_lung_mask,...]``) with ``images/<file>``
  and optional ``lung_masks/<stem>.png`` / ``infection_masks/<stem>.png``, as external-dev
  (``training.external``);
* ``class-folders``: ``<class>/<name>.png`` with optional ``<name>_lung.png`` and
  ``<name>_infection.png`` beside it, as the bundled ``samples/``.

And the database: studies whose reading is approved as one of the three classes, with their
approved lung / infection masks where there are any (``load_database_set``).

Images are letterboxed to the network's square as the app does, masks the same way. Sets are
bounded: at most ``limit`` images, evenly spaced over the set (it is sorted by class, so each
class keeps about its share), and never more than ``MAX_IMAGES``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from inference.model import CLASS_NAMES
from inference.preprocess import Letterbox
from training.data import SPLITS, SplitArrays, list_samples, read_gray

MAX_IMAGES = 5000  # an evaluation holds its images in memory: ~65 kB each at 256x256
MAX_FILE_BYTES = 64 * 1024 * 1024  # one image file; larger ones are refused, not decoded
LAYOUTS = ("covid-qu-ex", "labels-csv", "class-folders")
MASK_SUFFIXES = ("_lung", "_infection")
FOLDER_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what the folder reader decodes (OpenCV)

ItemProgress = Callable[[int, int], None]  # (items done, items in total)
LABELS = {"COVID-19": "COVID-19", "Non-COVID": "Non-COVID", "Normal": "Normal"}  # labels.csv


def letterbox_u8(image: np.ndarray, size: int) -> np.ndarray:
    """The app's letterbox (``Letterbox.apply``), back to uint8 for ``SplitArrays``."""
    box = Letterbox.fit(image.shape[0], image.shape[1], size)
    return np.clip(np.rint(box.apply(image)), 0, 255).astype(np.uint8)


class EvalSourceError(ValueError):
    """A set that cannot be evaluated; ``str(e)`` says why in plain words."""


@dataclass
class EvalSet:
    arrays: SplitArrays  # uint8 images and masks on the network grid, labels, names
    title: str
    layout: str  # one of LAYOUTS, or "database"
    has_lung_mask: np.ndarray  # bool (N,): lung metrics only where a mask exists
    infection_masks: bool  # False: infection Dice is not reported
    files: list[Path | None] = field(default_factory=list)  # per image, its file (folders)
    image_ids: list[int | None] = field(default_factory=list)  # per image, its study (database)
    notes: list[str] = field(default_factory=list)
    total_available: int = 0  # images in the source before the limit
    patients: list[str] = field(default_factory=list)  # labels.csv's patient column, if any


def spread(n: int, limit: int) -> np.ndarray:
    """``limit`` evenly spaced indices of ``n`` (all when ``limit`` is 0 or >= n)."""
    if not limit or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def _bounded(n: int, limit: int) -> tuple[np.ndarray, list[str]]:
    limit = min(limit or MAX_IMAGES, MAX_IMAGES)
    idx = spread(n, limit)
    notes = [] if len(idx) == n else [
        f"{len(idx)} of {n} images, evenly spaced over the set (limit {limit})."
    ]
    return idx, notes


def detect_layout(root: Path) -> str:
    from training.data import _subset_root

    try:
        _subset_root(root)
        return "covid-qu-ex"
    except FileNotFoundError:
        pass
    if (root / "labels.csv").is_file():
        return "labels-csv"
    if any((root / c).is_dir() for c in CLASS_NAMES):
        return "class-folders"
    raise EvalSourceError(
        "This folder is not a labelled set InfMap knows: expected the COVID-QU-Ex layout, "
        "a labels.csv with an images/ folder, or one folder per class ("
        + ", ".join(CLASS_NAMES) + ")."
    )


def _read(path: Path, size: int) -> np.ndarray:
    """A grayscale image or mask letterboxed to ``size`` (uint8)."""
    if path.stat().st_size > MAX_FILE_BYTES:
        raise EvalSourceError(f"{path.name} is larger than {MAX_FILE_BYTES // 2**20} MB")
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise EvalSourceError(f"{path.name} could not be read as an image")
    return letterbox_u8(image, size)


def _stack(
    items: Sequence[tuple[Path, int, Path | None, Path | None]], size: int,
    progress: ItemProgress | None, names: list[str] | None = None,
) -> tuple[SplitArrays, np.ndarray]:
    """(image, label, lung mask or None, infection mask or None) per item -> arrays."""
    n = len(items)
    images = np.zeros((n, size, size), np.uint8)
    lungs = np.zeros((n, size, size), np.uint8)
    infs = np.zeros((n, size, size), np.uint8)
    has = np.zeros(n, bool)
    for i, (image, _, lung, inf) in enumerate(items):
        images[i] = _read(image, size)
        if lung is not None:
            lungs[i], has[i] = _read(lung, size) > 127, True
        if inf is not None:
            infs[i] = _read(inf, size) > 127
        if progress is not None:
            progress(i + 1, n)
    labels = np.array([label for _, label, _, _ in items], np.int64)
    names = names if names is not None else [p.name for p, *_ in items]
    return SplitArrays(images, lungs, infs, labels, names), has


def _covid_qu_ex(root: Path, split: str, size: int, limit: int,
                 progress: ItemProgress | None) -> EvalSet:
    if split not in SPLITS:
        raise EvalSourceError(f"split must be one of {', '.join(SPLITS)}")
    samples = list_samples(root, split)
    idx, notes = _bounded(len(samples), limit)
    picked = [samples[i] for i in idx]
    n = len(picked)
    images = np.empty((n, size, size), np.uint8)
    lungs = np.empty((n, size, size), np.uint8)
    infs = np.empty((n, size, size), np.uint8)
    for i, s in enumerate(picked):  # 256x256 already: read_gray as training reads them
        images[i] = read_gray(s.image, size)
        lungs[i] = read_gray(s.lung_mask, size) > 127
        infs[i] = read_gray(s.infection_mask, size) > 127
        if progress is not None:
            progress(i + 1, n)
    arrays = SplitArrays(images, lungs, infs, np.array([s.label for s in picked], np.int64),
                         [s.image.name for s in picked])
    return EvalSet(arrays, f"COVID-QU-Ex {split}", "covid-qu-ex", np.ones(n, bool), True,
                   files=[s.image for s in picked], image_ids=[None] * n, notes=notes,
                   total_available=len(samples))


def load_labels_csv(
    root: Path, size: int, limit: int = 0, progress: ItemProgress | None = None
) -> EvalSet:
    """The ``labels-csv`` layout (``training.external`` reads external-dev through it). A
    ``has_lung_mask`` column, where present, says which images have a lung mask; otherwise a
    mask file's presence does. Names are the ``file`` column (sub-folders included)."""
    with open(root / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"file", "label"} <= set(rows[0]):
        raise EvalSourceError("labels.csv needs the columns file and label")
    unknown = sorted({r["label"] for r in rows} - set(LABELS))
    if unknown:
        raise EvalSourceError(f"labels.csv has labels InfMap does not know: {unknown[:5]}")
    idx, notes = _bounded(len(rows), limit)
    infection_dir = root / "infection_masks"
    items = []
    for i in idx:
        row = rows[i]
        image = (root / "images" / row["file"]).resolve()
        if not image.is_relative_to(root) or not image.is_file():
            raise EvalSourceError(f"labels.csv names a missing image: {row['file']}")
        stem = Path(row["file"]).with_suffix(".png")
        lung = root / "lung_masks" / stem
        inf = infection_dir / stem
        flagged = row.get("has_lung_mask")
        wanted = flagged is None or flagged.strip().lower() in {"1", "true", "yes"}
        items.append((image, CLASS_NAMES.index(LABELS[row["label"]]),
                      lung if wanted and lung.is_file() else None,
                      inf if inf.is_file() else None))
    arrays, has = _stack(items, size, progress, names=[rows[i]["file"] for i in idx])
    with_inf = infection_dir.is_dir()
    if not with_inf:
        notes.append("No infection_masks/ folder: infection Dice is not reported.")
    return EvalSet(arrays, root.name, "labels-csv", has, with_inf,
                   files=[it[0] for it in items], image_ids=[None] * len(items), notes=notes,
                   total_available=len(rows), patients=[rows[i].get("patient", "") for i in idx])


def _class_folders(root: Path, size: int, limit: int,
                   progress: ItemProgress | None) -> EvalSet:
    found = []
    for label, cls in enumerate(CLASS_NAMES):
        folder = root / cls
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if (path.suffix.lower() not in FOLDER_IMAGE_SUFFIXES or not path.is_file()
                    or path.stem.endswith(MASK_SUFFIXES)):
                continue
            lung, inf = (path.with_name(f"{path.stem}{s}.png") for s in MASK_SUFFIXES)
            found.append((path, label, lung if lung.is_file() else None,
                          inf if inf.is_file() else None))
    if not found:
        raise EvalSourceError("The class folders hold no images.")
    idx, notes = _bounded(len(found), limit)
    items = [found[i] for i in idx]
    arrays, has = _stack(items, size, progress)
    covid = [it for it in items if it[1] == CLASS_NAMES.index("COVID-19")]
    with_inf = bool(covid) and all(it[3] is not None for it in covid)
    if not with_inf:
        notes.append("Not every COVID-19 image has an infection mask: infection Dice is not "
                     "reported.")
    return EvalSet(arrays, root.name, "class-folders", has, with_inf,
                   files=[it[0] for it in items], image_ids=[None] * len(items), notes=notes,
                   total_available=len(found))


def load_folder(
    root: Path, size: int, split: str = "Test", limit: int = 0,
    progress: ItemProgress | None = None,
) -> EvalSet:
    """The labelled set in ``root`` (a resolved, existing directory; see ``detect_layout``)."""
    layout = detect_layout(root)
    if layout == "covid-qu-ex":
        return _covid_qu_ex(root, split, size, limit, progress)
    if layout == "labels-csv":
        return load_labels_csv(root, size, limit, progress)
    return _class_folders(root, size, limit, progress)


def load_database_set(
    session: Any, size: int, limit: int = 0, progress: ItemProgress | None = None
) -> EvalSet:
    """Studies with an approved reading of one of the three classes, with their approved
    masks (lung metrics where a lung mask is approved; infection Dice only when every
    COVID-19 study has an approved infection mask)."""
    from database import annotation_versions, images, reading_versions
    from database.masks import png_to_mask
    from inference.storage import xray_from_npz_bytes
    from training.corrections import letterbox_mask, letterbox_uint8

    readings = [r for r in reading_versions.training_readings(session, ("approved",))
                if r.label in CLASS_NAMES]
    masks: dict[int, dict[str, Any]] = {}
    for v in annotation_versions.training_annotations(session, ("approved",)):
        masks.setdefault(v.image_id, {})[v.kind] = v
    if not readings:
        raise EvalSourceError(
            "No study has an approved reading of COVID-19, Non-COVID or Normal yet: the "
            "database set needs approved readings to score the class.")
    idx, notes = _bounded(len(readings), limit)
    picked = [readings[i] for i in idx]
    n = len(picked)
    arr = {k: np.zeros((n, size, size), np.uint8) for k in ("images", "lung", "infection")}
    has = np.zeros(n, bool)
    names, ids = [], []
    for i, reading in enumerate(picked):
        image = images.get_image(session, reading.image_id)
        assert image is not None  # a reading refers to an existing image
        square, box = letterbox_uint8(xray_from_npz_bytes(images.read_image_payload(image))
                                      .pixels, size)
        arr["images"][i] = square
        for kind, version in masks.get(reading.image_id, {}).items():
            arr[kind][i] = letterbox_mask(png_to_mask(version.mask_png), box)
            has[i] |= kind == "lung"
        names.append(f"#{image.id} · {image.display_name}")
        ids.append(int(image.id))
        if progress is not None:
            progress(i + 1, n)
    labels = np.array([CLASS_NAMES.index(r.label) for r in picked], np.int64)
    covid = labels == CLASS_NAMES.index("COVID-19")
    with_inf = bool(covid.any()) and all(
        "infection" in masks.get(image_id, {})
        for image_id, c in zip(ids, covid, strict=True) if c)
    if not with_inf:
        notes.append("Not every COVID-19 study has an approved infection mask: infection Dice "
                     "is not reported.")
    if not has.all():
        notes.append(f"Lung metrics over the {int(has.sum())} studies with an approved lung "
                     "mask.")
    arrays = SplitArrays(arr["images"], arr["lung"], arr["infection"], labels, names)
    return EvalSet(arrays, "approved studies in the database", "database", has, with_inf,
                   files=[None] * n, image_ids=list(ids), notes=notes,
                   total_available=len(readings))
