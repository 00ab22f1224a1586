"""DICOM header reading for the loader: what a file claims to be, and quiet access to its values.

pydicom logs (and warns) header problems quoting the offending values, which can be names or IDs;
``quiet()`` drops those records while a file is read. Only a de-identified summary of the header
leaves the loader.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from inference.checks import UnsupportedImage

ACCEPTED_MODALITIES = {"CR", "DX"}  # computed / digital radiography


# Secondary captures and exports often say OT or nothing: accepted if the body part allows it.
LENIENT_MODALITIES = {"OT", None}


CHEST_WORDS = ("CHEST", "THORA", "TORAX", "LUNG")  # CHEST, THORAX, TORAX (es/pt), LUNG(S)


LATERAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "LLAT", "RLAT"}


NO_PIXELS = (
    "This DICOM file contains no image (no pixel data). It may be a report, a structured "
    "document, or an incomplete file."
)

MODALITY_NAMES = {
    "CT": "a CT image",
    "MR": "an MRI image",
    "US": "an ultrasound image",
    "NM": "a nuclear medicine image",
    "PT": "a PET image",
    "MG": "a mammogram",
    "XA": "an angiography image",
    "RF": "a fluoroscopy image",
    "IO": "an intra-oral dental X-ray",
    "PX": "a panoramic dental X-ray",
    "DG": "a diaphanography image",
    "BMD": "a bone densitometry scan",
    "RTIMAGE": "a radiotherapy image",
    "ES": "an endoscopy image",
    "XC": "a photograph",
    "OP": "an eye photograph",
    "OPT": "an eye OCT scan",
    "SM": "a microscopy slide",
    "SEG": "a segmentation",
    "SR": "a structured report",
}


# pydicom logs (and warns) header problems quoting the offending values, which can be names or
# IDs. While we read a file, drop its log records on this thread; warnings are captured instead.
_state = threading.local()


class _DropWhileReading(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_state, "depth", 0)


_FILTER = _DropWhileReading()
for _name in ("pydicom", "pydicom.pixels.decoders.base", "pydicom.pixels.utils"):
    logging.getLogger(_name).addFilter(_FILTER)


@contextmanager
def quiet() -> Iterator[list[warnings.WarningMessage]]:
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        _state.depth -= 1


def check_content(ds: Dataset) -> None:
    """Pixel data present; a single-frame frontal chest radiograph by its header."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise UnsupportedImage(NO_PIXELS)

    modality = header_str(ds, "Modality")
    body_part = header_str(ds, "BodyPartExamined")
    if modality not in ACCEPTED_MODALITIES and modality not in LENIENT_MODALITIES:
        what = MODALITY_NAMES.get(modality or "", "not a radiograph")
        raise UnsupportedImage(
            f"This is {what} (DICOM modality '{modality}'); the model is for frontal chest "
            "X-rays (radiographs, modality CR or DX)."
        )
    if body_part is not None and not any(word in body_part for word in CHEST_WORDS):
        raise UnsupportedImage(
            f"This radiograph is labelled as body part '{body_part}', not chest; "
            "the model is for frontal chest X-rays."
        )

    view = header_str(ds, "ViewPosition")
    if view in LATERAL_VIEWS:
        raise UnsupportedImage(
            f"This is a lateral view (view position '{view}'); the model works on frontal "
            "chest X-rays only (PA or AP view)."
        )

    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise UnsupportedImage(
            f"This DICOM file holds {frames} images (multi-frame); please upload a single "
            "frontal chest X-ray image."
        )


def header_str(ds: Dataset, keyword: str) -> str | None:
    """Upper-cased, stripped first value of a coded-string element; None if absent or empty."""
    try:
        value = ds.get(keyword)
    except Exception:  # an undecodable value counts as absent
        return None
    if isinstance(value, MultiValue):
        value = value[0] if len(value) else None
    if value is None:
        return None
    text = str(value).strip().upper()
    return text or None


def pixel_spacing(ds: Dataset) -> list[float] | None:
    """[row, column] spacing in mm: PixelSpacing (at the patient) else ImagerPixelSpacing."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = ds.get(keyword)
            if value is None or len(value) != 2:
                continue
            spacing = [float(v) for v in value]
        except (TypeError, ValueError):
            continue
        if all(np.isfinite(s) and s > 0 for s in spacing):  # some exporters write 0\0
            return spacing
    return None


def patient_id(ds: Dataset) -> str | None:
    try:
        value = ds.get("PatientID")
    except Exception:
        return None
    return None if value is None else str(value)
