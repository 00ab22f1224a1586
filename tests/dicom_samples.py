"""Test data helpers: real DICOM samples from pydicom-data, and small synthetic DICOM files.

``pydicom_data_file("RG1_UNCR.dcm")`` gives the path of a file shipped by the ``pydicom-data``
package (installed from requirements.txt; no download). Useful real radiographs:

* ``RG1_UNCR.dcm`` / ``RG1_J2KR.dcm``: a PA chest CR (MONOCHROME1, 1955 x 1841, 15-bit),
  uncompressed and JPEG 2000 lossless; ``RG1_J2KI.dcm`` is JPEG 2000 lossy and ``RG1_UNCI.dcm``
  that lossy image stored uncompressed.
* ``RG3_*.dcm``: a CR of the distal tibia (BodyPartExamined EXTREMITY), i.e. not a chest.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)


def pydicom_data_dir() -> Path:
    """The data folder of the installed ``pydicom-data`` package (import name ``data_store``)."""
    try:
        from data_store import DataStore  # the package's own locator

        return Path(DataStore().data_path)
    except ImportError:
        spec = importlib.util.find_spec("data_store")
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                "pydicom-data is not installed (pip install -r requirements.txt)"
            ) from None
        return Path(spec.origin).resolve().parent / "data"


def pydicom_data_file(name: str) -> Path:
    """Path of one pydicom-data sample file, e.g. ``pydicom_data_file("RG1_UNCR.dcm")``."""
    path = pydicom_data_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"{name} is not in pydicom-data ({pydicom_data_dir()})")
    return path


def synthetic_dicom(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    modality: str | None = "DX",
    body_part: str | None = "CHEST",
    view_position: str | None = "PA",
    patient_id: str | None = "SYNTH-0001",
    **tags: Any,
) -> Dataset:
    """A minimal valid DX image dataset (file meta included) holding ``pixels``.

    ``pixels``: uint8/uint16/int16 (rows, cols), or (frames, rows, cols) for multi-frame. Extra
    ``tags`` are set by keyword (``RescaleSlope=2``); a value of ``None`` deletes the element.
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Synthetic^Patient"
    for keyword, value in (
        ("PatientID", patient_id),
        ("Modality", modality),
        ("BodyPartExamined", body_part),
        ("ViewPosition", view_position),
    ):
        if value is not None:
            setattr(ds, keyword, value)
    bits = bits_stored or np.dtype(pixels.dtype).itemsize * 8
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits)
    for keyword, value in tags.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def dicom_bytes(ds: Dataset, *, file_format: bool = True, **kwargs: Any) -> bytes:
    """Serialise ``ds``; ``file_format=False`` writes it without preamble (old-style files).

    ``kwargs`` go to ``Dataset.save_as`` (e.g. ``implicit_vr=False, little_endian=True`` for a
    private transfer syntax).
    """
    buffer = io.BytesIO()
    if not file_format:
        ds.preamble = None
    ds.save_as(buffer, enforce_file_format=file_format, **kwargs)
    return buffer.getvalue()
