"""DICOM decoding for ``inference.loading``: checks, pixel decoding and display transforms.

Pipeline (PS3.3 C.11 / PS3.4 N.2): stored values -> modality LUT (rescale) = ``raw`` -> VOI LUT
or window -> MONOCHROME1 inversion = ``pixels``. Only a de-identified summary of the header leaves
this module; the dataset itself is dropped after decoding.

Compressed transfer syntaxes are decoded by pydicom's plugins (pylibjpeg with openjpeg/libjpeg
for JPEG 2000, JPEG lossless/baseline and JPEG-LS; pydicom's own RLE decoder).
"""

from __future__ import annotations

import io
import logging
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    get_decoder,
    pixel_array,
)
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from inference.loading import (
    MAX_PIXELS,
    UnsupportedImage,
    apply_window,
    check_dimensions,
    check_not_blank,
    patient_hash,
    percentile_window,
)

ACCEPTED_MODALITIES = {"CR", "DX"}  # computed / digital radiography
# Secondary captures and exports often say OT or nothing: accepted if the body part allows it.
LENIENT_MODALITIES = {"OT", None}
CHEST_WORDS = ("CHEST", "THORA", "TORAX", "LUNG")  # CHEST, THORAX, TORAX (es/pt), LUNG(S)
LATERAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "LLAT", "RLAT"}

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

TRUNCATED = (
    "The file is incomplete: it ends before all of its data (the upload or export may have been "
    "interrupted). Please upload the complete file."
)
UNDECODABLE = (
    "The image data in this DICOM file could not be decoded; the file may be damaged or incomplete."
)
NO_PIXELS = (
    "This DICOM file contains no image (no pixel data). It may be a report, a structured "
    "document, or an incomplete file."
)

_UNDEFINED_LENGTH = 0xFFFFFFFF
_MAX_INFLATED_BYTES = MAX_PIXELS * 4 + 64 * 1024 * 1024  # 32-bit pixels at the limit + header


@dataclass
class DecodedDicom:
    pixels: np.ndarray
    raw: np.ndarray
    window: tuple[float, float]
    invert: bool
    metadata: dict[str, Any]


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
def _quiet() -> Iterator[list[warnings.WarningMessage]]:
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        _state.depth -= 1


def decode_dicom(data: bytes, *, force: bool = False) -> DecodedDicom:
    """Read, check and decode one DICOM file. ``force`` for files without the 'DICM' preamble."""
    # Quiet throughout: pydicom validates values lazily, on first access, and quotes them.
    with _quiet():
        return _decode_dicom(data, force)


def _decode_dicom(data: bytes, force: bool) -> DecodedDicom:
    _check_deflated_size(data)
    ds = _read_dataset(data, force)
    try:
        _check_content(ds)
        rows, columns = int(ds.Rows), int(ds.Columns)
        photometric = _header_str(ds, "PhotometricInterpretation") or "MONOCHROME2"
        bits_stored = int(ds.get("BitsStored") or 0) or None
    except UnsupportedImage:
        raise
    except Exception as exc:  # malformed values in the header (wrong VR, bad numbers)
        raise UnsupportedImage(
            "The DICOM header is damaged (its image size or format fields are invalid)."
        ) from exc
    check_dimensions(rows, columns)
    if photometric not in (
        "MONOCHROME1",
        "MONOCHROME2",
        "RGB",
        "PALETTE COLOR",
        "YBR_FULL",
        "YBR_FULL_422",
        "YBR_ICT",
        "YBR_RCT",
    ):
        raise UnsupportedImage(
            f"This DICOM image uses an unsupported colour format ('{photometric}')."
        )

    tsyntax = _transfer_syntax(ds)
    plugin = _decoding_plugin(tsyntax)
    if tsyntax.is_encapsulated:
        _check_codestream_size(ds)

    with _quiet():
        try:
            arr = pixel_array(ds, decoding_plugin=plugin)
        except Exception as exc:  # decoders raise many types; the user only needs to know this
            raise UnsupportedImage(UNDECODABLE) from exc

    if photometric.startswith("MONOCHROME"):
        if arr.shape != (rows, columns):
            raise UnsupportedImage(UNDECODABLE)
        raw, pixels, window = _monochrome(arr, ds)
        invert = photometric == "MONOCHROME1"
        if invert:
            np.subtract(np.float32(1.0), pixels, out=pixels)
    else:
        raw, pixels, window = _colour(arr, ds, photometric, rows, columns)
        invert = False

    metadata: dict[str, Any] = {
        "modality": _header_str(ds, "Modality"),
        "view_position": _header_str(ds, "ViewPosition"),
        "body_part": _header_str(ds, "BodyPartExamined"),
        "rows": int(pixels.shape[0]),
        "columns": int(pixels.shape[1]),
        "pixel_spacing": _pixel_spacing(ds),
        "photometric_interpretation": photometric,
        "transfer_syntax": tsyntax.name,
        "bits_stored": bits_stored,
        "format": "DICOM",
        "patient_hash": patient_hash(_patient_id(ds)),
    }
    return DecodedDicom(pixels=pixels, raw=raw, window=window, invert=invert, metadata=metadata)


# --------------------------------------------------------------------------------------------
# Reading and checks
# --------------------------------------------------------------------------------------------


def _read_dataset(data: bytes, force: bool) -> Dataset:
    with _quiet() as caught:
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=force)
        except InvalidDicomError as exc:
            raise UnsupportedImage("This file is not a valid DICOM file.") from exc
        except Exception as exc:  # the parser raises many types on corrupt input
            raise UnsupportedImage("This DICOM file is damaged and could not be read.") from exc
    # pydicom reads truncated files without raising: it warns (undefined-length data that never
    # ends) or keeps elements whose value is shorter than their declared length.
    if any("End of file" in str(w.message) for w in caught):
        raise UnsupportedImage(TRUNCATED)
    deflated = _file_transfer_syntax(ds) == DeflatedExplicitVRLittleEndian
    if _is_truncated(ds, None if deflated else len(data)) or _is_truncated(ds.file_meta, None):
        raise UnsupportedImage(TRUNCATED)
    return ds


def _is_truncated(ds: Dataset, file_size: int | None) -> bool:
    """True if an element's value is shorter than declared, or the file ends inside a header."""
    last_end = 0
    for tag in list(ds.keys()):
        elem = ds.get_item(tag)
        if not isinstance(elem, RawDataElement) or elem.length == _UNDEFINED_LENGTH:
            continue
        if elem.value is not None and len(elem.value) < elem.length:
            return True
        last_end = max(last_end, elem.value_tell + elem.length)
    # The parser stops silently when fewer than 8 bytes (one element header) remain.
    return file_size is not None and last_end > 0 and 0 < file_size - last_end < 8


def _check_deflated_size(data: bytes) -> None:
    """Bound the inflated size of a Deflated-transfer-syntax file before pydicom inflates it all."""
    if DeflatedExplicitVRLittleEndian.encode() not in data[:4096]:
        return
    # Mandatory (0002,0000) UL group length, explicit VR little endian, right after 'DICM'.
    if len(data) < 144 or data[132:136] != b"\x02\x00\x00\x00":
        return
    start = 144 + struct.unpack("<I", data[140:144])[0]
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflater.decompress(data[start:], _MAX_INFLATED_BYTES)
    except zlib.error as exc:
        raise UnsupportedImage("This compressed DICOM file is damaged.") from exc
    if inflater.unconsumed_tail:
        raise UnsupportedImage(
            f"The image is too large (the limit is {MAX_PIXELS / 1e6:.0f} megapixels)."
        )


def _check_content(ds: Dataset) -> None:
    """Pixel data present; a single-frame frontal chest radiograph by its header."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise UnsupportedImage(NO_PIXELS)

    modality = _header_str(ds, "Modality")
    body_part = _header_str(ds, "BodyPartExamined")
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

    view = _header_str(ds, "ViewPosition")
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


def _file_transfer_syntax(ds: Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    value = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(value)) if value else None


def _transfer_syntax(ds: Dataset) -> UID:
    tsyntax = _file_transfer_syntax(ds)
    if tsyntax is None:
        # No file meta (old files): the encoding pydicom detected while reading is the syntax.
        implicit, little = ds.original_encoding
        if implicit:
            tsyntax = ImplicitVRLittleEndian
        else:
            tsyntax = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        ds.file_meta.TransferSyntaxUID = tsyntax
    if not tsyntax.is_transfer_syntax:
        raise UnsupportedImage(
            f"This DICOM file uses an unknown encoding ('{tsyntax}') and cannot be decoded."
        )
    return tsyntax


def _decoding_plugin(tsyntax: UID) -> str:
    """pylibjpeg when it can decode this syntax; '' lets pydicom choose (native, RLE)."""
    unsupported = (
        f"This DICOM file is compressed as '{tsyntax.name}', which this app cannot decode. "
        "Please export it uncompressed, or as JPEG 2000, JPEG lossless or RLE."
    )
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise UnsupportedImage(unsupported) from exc
    if not decoder.is_available:
        raise UnsupportedImage(unsupported)
    return "pylibjpeg" if "pylibjpeg" in decoder.available_plugins else ""


def _check_codestream_size(ds: Dataset) -> None:
    """Decoders allocate what the codestream declares, whatever Rows/Columns say: check it."""
    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    except Exception as exc:  # broken encapsulation (item tags, offsets)
        raise UnsupportedImage(UNDECODABLE) from exc
    size = codestream_size(frame)
    if size is not None and size[0] * size[1] > MAX_PIXELS:
        check_dimensions(*size)


def codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) declared by a JPEG / JPEG-LS SOF or JPEG 2000 SIZ marker, else None."""
    try:
        # JPEG 2000 codestream, possibly inside a JP2 box wrapper: SOC then SIZ.
        j2k = frame.find(b"\xff\x4f\xff\x51", 0, 4096)
        if j2k >= 0:
            xsiz, ysiz, x0, y0 = struct.unpack(">IIII", frame[j2k + 8 : j2k + 24])
            return ysiz - y0, xsiz - x0
        if frame[:2] != b"\xff\xd8":
            return None
        pos = 2
        while pos + 4 <= len(frame):
            if frame[pos] != 0xFF:
                return None
            marker = frame[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            # SOF0-SOF15 except DHT (C4), JPG (C8), DAC (CC); SOF55 (F7) is JPEG-LS.
            if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
                rows, columns = struct.unpack(">HH", frame[pos + 5 : pos + 9])
                return rows, columns
            (length,) = struct.unpack(">H", frame[pos + 2 : pos + 4])
            pos += 2 + length
    except (struct.error, IndexError):
        return None
    return None


# --------------------------------------------------------------------------------------------
# Display transforms
# --------------------------------------------------------------------------------------------


def _monochrome(arr: np.ndarray, ds: Dataset) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """raw (modality LUT applied), un-inverted pixels in [0, 1], default window."""
    with _quiet():
        raw = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    if not np.isfinite(raw).all():  # float pixel data can hold NaN/inf
        raw = np.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)
    check_not_blank(raw)

    header_window = _header_window(ds)
    window = header_window or percentile_window(raw)
    pixels = _voi_lut_pixels(raw, ds)
    if pixels is None:
        function = _header_str(ds, "VOILUTFunction") or "LINEAR"
        if header_window is not None and function == "SIGMOID":
            center, width = header_window
            pixels = (1.0 / (1.0 + np.exp(-4.0 * (raw - center) / width))).astype(np.float32)
        else:
            # LINEAR_EXACT differs from LINEAR by half a stored value: not visible, not handled.
            pixels = apply_window(raw, *window, invert=False)
    return raw, pixels, window


def _header_window(ds: Dataset) -> tuple[float, float] | None:
    """The first (center, width) from the header, if valid; width clamped to DICOM's >= 1."""
    try:
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is None or width is None:
            return None
        center = float(center[0] if isinstance(center, MultiValue) else center)
        width = float(width[0] if isinstance(width, MultiValue) else width)
    except (TypeError, ValueError, IndexError):
        return None
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 0:
        return None
    return center, max(width, 1.0)


def _voi_lut_pixels(raw: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Apply the header's VOI LUT (pydicom), scaled to [0, 1] by the LUT's own output range."""
    sequence = ds.get("VOILUTSequence")
    if not sequence:
        return None
    try:
        descriptor = [int(v) for v in sequence[0].LUTDescriptor]
        entries = descriptor[0] or 65536
        first = descriptor[1]
        # LUT inputs are integers; clip first, as values far outside the LUT overflow its dtype.
        ints = np.clip(np.rint(raw), first, first + entries - 1).astype(np.int64)
        with _quiet():
            out = np.asarray(apply_voi_lut(ints, ds, prefer_lut=True), dtype=np.float32)
            lut = apply_voi_lut(np.arange(first, first + entries, dtype=np.int64), ds)
    except Exception:  # malformed LUT: fall back to the window, which is always sensible
        return None
    lo, hi = float(np.min(lut)), float(np.max(lut))
    if hi <= lo:
        return None
    out -= np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def _colour(
    arr: np.ndarray, ds: Dataset, photometric: str, rows: int, columns: int
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Colour (secondary capture) images: luminance, full-range window so raw re-windows alike."""
    if photometric == "PALETTE COLOR":
        with _quiet():
            try:
                arr = apply_color_lut(arr, ds)
            except Exception as exc:
                raise UnsupportedImage(UNDECODABLE) from exc
        bits = 8 if arr.dtype == np.uint8 else 16
    else:
        bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
    if arr.shape != (rows, columns, 3):
        raise UnsupportedImage(UNDECODABLE)
    rgb = arr.astype(np.float32)
    raw = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]  # ITU-R BT.601 luma
    check_not_blank(raw)
    top = float(2**bits - 1)
    window = (top / 2.0 + 0.5, top + 1.0)  # maps 0 -> 0 and top -> 1
    return raw, apply_window(raw, *window, invert=False), window


# --------------------------------------------------------------------------------------------
# Header values
# --------------------------------------------------------------------------------------------


def _header_str(ds: Dataset, keyword: str) -> str | None:
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


def _pixel_spacing(ds: Dataset) -> list[float] | None:
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


def _patient_id(ds: Dataset) -> str | None:
    try:
        value = ds.get("PatientID")
    except Exception:
        return None
    return None if value is None else str(value)
