"""Input groups for the out-of-domain benchmark: each a stream of float32 [0, 1] 2-D images.

In distribution: COVID-QU-Ex Test, decoded by ``inference.loading.load_xray`` as the app does.
Out of distribution, from the most to the least chest-X-ray-like:

* ``external-dev``: chest X-rays of another public source (evaluation only), via ``load_xray``.
* ``rotated-90``, ``rotated-180``, ``inverted``, ``cropped-quarter``: Test X-rays transformed.
* ``non-chest-radiographs``: pydicom's / pydicom-data's CR, DX, RF, XA and MG files that are not
  chest (RG3 tibia, cervical-spine CRs).
* ``ct-mr-slices``: pydicom's / pydicom-data's files with modality CT or MR.
* ``photographs``: the photographs shipped inside the scikit-image wheel (no download).

DICOM files go through the project's loader where it accepts them; it refuses non-chest and
CT/MR files by header, so those fall back to pydicom's pixel data with the modality LUT applied,
MONOCHROME1 inverted (air dark, as the model expects) and min-max scaled to [0, 1]: the point is
the score, not the loader's refusal. Identical decoded pixel arrays (the same image stored in
several lossless encodings) are kept once so that no image counts twice.
"""

from __future__ import annotations

import csv
import hashlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

from inference.limits import MIN_SIDE
from inference.loading import UnsupportedImage, load_xray
from inference.model import CLASS_NAMES
from training.data import list_samples

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"

NON_CHEST_RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "RF", "XA", "MG"})
CROSS_SECTIONAL_MODALITIES = frozenset({"CT", "MR"})
CHEST_WORDS = ("CHEST", "THORA", "TORAX", "LUNG")

# Photographs (and photomicrographs) whose files ship inside the scikit-image wheel. Synthetic
# images (chessboard, logo, phantom, binary silhouettes) are left out: they are not photographs.
SKIMAGE_PHOTOGRAPHS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
    "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
    "microaneurysms.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png",
    "retina.jpg", "rocket.jpg", "text.png",
)


@dataclass(frozen=True)
class InputImage:
    group: str
    name: str  # file name (public data sets only), with the transform or frame appended
    pixels: np.ndarray  # float32 (H, W) in [0, 1], air dark for radiographs
    label: int | None  # index into CLASS_NAMES for labelled chest X-rays, else None
    decoded_by: str  # "load_xray", "pydicom+min-max" or "scikit-image"


def as_unit_float(image: np.ndarray) -> np.ndarray:
    """Any real 2-D array -> float32 min-max scaled to [0, 1]; a constant image is refused."""
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {arr.shape}")
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if not hi > lo:
        raise ValueError("the image is constant")
    return ((arr - lo) / (hi - lo)).astype(np.float32)


# --- chest X-rays -------------------------------------------------------------------------------


def covid_split(
    split: str, data_root: Path = DEFAULT_DATA, limit: int | None = None
) -> Iterator[InputImage]:
    """One COVID-QU-Ex split, ``limit`` images spread over the classes, decoded as the app does."""
    samples = list_samples(data_root / "covid-qu-ex", split)
    for s in _spread(samples, limit):
        yield InputImage(f"covid-qu-ex-{split.lower()}", s.image.name, load_xray(s.image).pixels,
                         s.label, "load_xray")


def covid_test(data_root: Path = DEFAULT_DATA, limit: int | None = None) -> Iterator[InputImage]:
    """COVID-QU-Ex Test: the in-distribution reference every group is compared with."""
    return covid_split("Test", data_root, limit)


def external_dev(data_root: Path = DEFAULT_DATA, limit: int | None = None) -> Iterator[InputImage]:
    """external-dev chest X-rays with their labels (evaluation only)."""
    base = data_root / "external-dev"
    with open(base / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in _spread(rows, limit):
        pixels = load_xray(base / "images" / row["file"]).pixels
        yield InputImage("external-dev", Path(row["file"]).name, pixels,
                         CLASS_NAMES.index(row["label"]), "load_xray")


def _spread(items: list, limit: int | None) -> list:
    """``limit`` items evenly spaced over a class-sorted list, so a quick run sees every class."""
    if limit is None or limit >= len(items):
        return items
    idx = np.linspace(0, len(items) - 1, num=max(limit, 0)).round().astype(int)
    return [items[i] for i in idx]


# --- transformed X-rays -------------------------------------------------------------------------


def rotate_90(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(pixels, k=1))


def rotate_180(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(pixels, k=2))


def invert(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (1.0 - pixels).astype(np.float32)


def crop_quarter(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A window of half the height and half the width (a quarter of the area) at a random place."""
    h, w = pixels.shape
    ch, cw = max(1, h // 2), max(1, w // 2)
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    return np.ascontiguousarray(pixels[top : top + ch, left : left + cw])


TRANSFORMS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "rotated-90": rotate_90,
    "rotated-180": rotate_180,
    "inverted": invert,
    "cropped-quarter": crop_quarter,
}


def transformed(
    images: Iterable[InputImage], transform: str, seed: int = 0
) -> Iterator[InputImage]:
    """``images`` passed through one of :data:`TRANSFORMS` (labels dropped: not chest-like)."""
    fn = TRANSFORMS[transform]
    rng = np.random.default_rng(seed)
    for img in images:
        yield InputImage(transform, f"{img.name}:{transform}", fn(img.pixels, rng), None,
                         img.decoded_by)


# --- DICOM test files ---------------------------------------------------------------------------


def dicom_test_files() -> list[Path]:
    """pydicom's own test files and the installed pydicom-data files (local only, no download)."""
    from pydicom.data import get_testdata_files

    return sorted({Path(p) for p in get_testdata_files("**/*") if Path(p).is_file()})


def _header(path: Path) -> pydicom.Dataset | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, AttributeError, KeyError, TypeError):
        return None


def _is_chest(ds: pydicom.Dataset) -> bool:
    body = str(ds.get("BodyPartExamined") or "").upper()
    return any(word in body for word in CHEST_WORDS)


def is_non_chest_radiograph(ds: pydicom.Dataset) -> bool:
    return ds.get("Modality") in NON_CHEST_RADIOGRAPH_MODALITIES and not _is_chest(ds)


def is_cross_sectional(ds: pydicom.Dataset) -> bool:
    return ds.get("Modality") in CROSS_SECTIONAL_MODALITIES


def dicom_pixels(path: Path) -> tuple[np.ndarray, str]:
    """(float32 [0, 1] pixels, how decoded): the project's loader, else pydicom + min-max.

    Multi-frame files give their middle frame. Raises ValueError for files with no usable
    monochrome 2-D image.
    """
    try:
        return load_xray(path).pixels, "load_xray"
    except UnsupportedImage:
        pass  # refused by header (not a chest radiograph): decode the pixel data directly
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path)
            arr = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - any decoder failure means "skip this file"
            raise ValueError(f"pixel data not decodable ({type(exc).__name__})") from exc
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ValueError("not a monochrome image")
    if arr.ndim == 3:
        arr = arr[arr.shape[0] // 2]
    values = apply_modality_lut(arr, ds)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        values = -np.asarray(values, dtype=np.float64)  # air dark, as the model expects
    return as_unit_float(values), "pydicom+min-max"


def dicom_group(
    group: str, select: Callable[[pydicom.Dataset], bool], skipped: list[dict] | None = None
) -> Iterator[InputImage]:
    """Every DICOM test file whose header passes ``select``, decoded, exact duplicates dropped.

    Files that cannot be decoded, or are smaller than the app accepts (``MIN_SIDE``; pydicom's
    16 x 16 DICOMDIR thumbnails), are reported in ``skipped`` (name and reason), not raised.
    """
    seen: set[str] = set()
    for path in dicom_test_files():
        ds = _header(path)
        if ds is None or "Rows" not in ds or not select(ds):
            continue
        try:
            pixels, how = dicom_pixels(path)
        except ValueError as exc:
            _skip(skipped, group, _dicom_name(path), str(exc))
            continue
        if min(pixels.shape) < MIN_SIDE:
            _skip(skipped, group, _dicom_name(path),
                  f"{pixels.shape[1]} x {pixels.shape[0]} px, below the app's minimum {MIN_SIDE}")
            continue
        digest = hashlib.sha256(pixels.tobytes() + str(pixels.shape).encode()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        yield InputImage(group, _dicom_name(path), pixels, None, how)


def _skip(skipped: list[dict] | None, group: str, name: str, reason: str) -> None:
    if skipped is not None:
        skipped.append({"group": group, "name": name, "reason": reason})


def _dicom_name(path: Path) -> str:
    # pydicom's DICOMDIR test files have numeric names; keep their series folder for clarity.
    return path.name if path.suffix else f"{path.parent.name}/{path.name}"


def non_chest_radiographs(skipped: list[dict] | None = None) -> Iterator[InputImage]:
    return dicom_group("non-chest-radiographs", is_non_chest_radiograph, skipped)


def ct_mr_slices(skipped: list[dict] | None = None) -> Iterator[InputImage]:
    return dicom_group("ct-mr-slices", is_cross_sectional, skipped)


# --- photographs --------------------------------------------------------------------------------


def photographs() -> Iterator[InputImage]:
    """scikit-image's bundled photographs in grayscale, read from the wheel's own data folder."""
    import skimage.data
    from skimage import color, io

    folder = Path(skimage.data.data_dir)
    for name in SKIMAGE_PHOTOGRAPHS:
        path = folder / name
        if not path.is_file():  # a file the wheel does not ship would need a download: skip it
            continue
        image = io.imread(path)
        if image.ndim == 3:
            image = color.rgb2gray(image[..., :3])
        yield InputImage("photographs", name, as_unit_float(image), None, "scikit-image")


# --- reference case -----------------------------------------------------------------------------


def rg1_encodings() -> Iterator[InputImage]:
    """pydicom-data's RG1 PA chest CR in its four encodings, decoded by the project's loader.

    Not an out-of-domain group (it is a chest X-ray): the issue's target is that it is not called
    COVID-19 with p > 0.5 while ``in_domain``.
    """
    for path in dicom_test_files():
        if path.name.startswith("RG1_") and path.suffix == ".dcm":
            yield InputImage("rg1", path.name, load_xray(path).pixels, None, "load_xray")
