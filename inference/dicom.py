"""DICOM decoding for the loader: reading, size checks and pixel decoding.

Header checks and quiet value access: ``inference.dicom_header``; display transforms (modality
LUT, VOI LUT / window, colour): ``inference.dicom_display``. Compressed transfer syntaxes are
decoded by pydicom's plugins (pylibjpeg with openjpeg/libjpeg for JPEG 2000, JPEG lossless/baseline
and JPEG-LS; pydicom's own RLE decoder).
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from inference.checks import UnsupportedImage, check_dimensions, check_memory
from inference.deid import basic_profile, deidentified_uid, patient_hash
from inference.dicom_display import UNDECODABLE, colour, monochrome
from inference.dicom_header import check_content, header_str, patient_id, pixel_spacing, quiet
from inference.limits import MAX_PIXELS
from inference.png_jpeg import check_jpeg_data_size, jpeg_frame_header

TRUNCATED = (
    "The file is incomplete: it ends before all of its data (the upload or export may have been "
    "interrupted). Please upload the complete file."
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


def decode_dicom(data: bytes, *, force: bool = False) -> DecodedDicom:
    """Read, check and decode one DICOM file. ``force`` for files without the 'DICM' preamble."""
    # Quiet throughout: pydicom validates values lazily, on first access, and quotes them.
    with quiet():
        return _decode_dicom(data, force)


def _decode_dicom(data: bytes, force: bool) -> DecodedDicom:
    _check_deflated_size(data)
    ds = _read_dataset(data, force)
    try:
        check_content(ds)
        rows, columns = int(ds.Rows), int(ds.Columns)
        photometric = header_str(ds, "PhotometricInterpretation") or "MONOCHROME2"
        bits_stored = int(ds.get("BitsStored") or 0) or None
        stored_bytes = int(ds.get("SamplesPerPixel") or 1) * -(
            -int(ds.get("BitsAllocated") or 16) // 8
        )
    except UnsupportedImage:
        raise
    except Exception as exc:  # malformed values in the header (wrong VR, bad numbers)
        raise UnsupportedImage(
            "The DICOM header is damaged (its image size or format fields are invalid)."
        ) from exc
    check_dimensions(rows, columns)
    # Peak while decoding: the stored array (twice while a codec hands it over), the modality
    # LUT in float64, raw and pixels in float32, and both pickled once more to leave the worker.
    check_memory(rows, columns, 2 * stored_bytes + 8 + 8 + 8 + (12 if stored_bytes > 2 else 0))
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

    with quiet():
        try:
            arr = pixel_array(ds, decoding_plugin=plugin)
        except Exception as exc:  # decoders raise many types; the user only needs to know this
            raise UnsupportedImage(UNDECODABLE) from exc

    if photometric.startswith("MONOCHROME"):
        if arr.shape != (rows, columns):
            raise UnsupportedImage(UNDECODABLE)
        raw, pixels, window = monochrome(arr, ds)
        invert = photometric == "MONOCHROME1"
        if invert:
            np.subtract(np.float32(1.0), pixels, out=pixels)
    else:
        raw, pixels, window = colour(arr, ds, photometric, rows, columns)
        invert = False

    clean = deidentify_header(ds)  # the header fields kept come from the de-identified copy
    metadata: dict[str, Any] = {
        "modality": header_str(clean, "Modality"),
        "view_position": header_str(clean, "ViewPosition"),
        "body_part": header_str(clean, "BodyPartExamined"),
        "rows": int(pixels.shape[0]),
        "columns": int(pixels.shape[1]),
        "pixel_spacing": pixel_spacing(clean),
        "photometric_interpretation": photometric,
        "transfer_syntax": tsyntax.name,
        "bits_stored": bits_stored,
        "format": "DICOM",
        "patient_hash": patient_hash(patient_id(ds)),
        # De-identified stand-ins (``inference.deid``): what a DICOM SEG of this study refers to.
        "study_uid": deidentified_uid(_uid(ds, "StudyInstanceUID")),
        "series_uid": deidentified_uid(_uid(ds, "SeriesInstanceUID")),
        "sop_instance_uid": deidentified_uid(_uid(ds, "SOPInstanceUID")),
        "sop_class_uid": _uid(clean, "SOPClassUID"),  # the kind of object, not identifying
        "patient_orientation": _orientation(clean),
    }
    return DecodedDicom(pixels=pixels, raw=raw, window=window, invert=invert, metadata=metadata)


def deidentify_header(ds: Dataset) -> Dataset:
    """``inference.deid.basic_profile`` of the header; a header it cannot process is refused
    (nothing of a file is stored that could not be de-identified)."""
    with quiet():
        try:
            return basic_profile(ds)
        except Exception as exc:  # a malformed element the profile trips over
            raise UnsupportedImage(
                "This DICOM file's header could not be de-identified, so it is not stored."
            ) from exc


def _uid(ds: Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # an undecodable value counts as absent
        return None
    text = str(value).strip().rstrip("\x00") if value is not None else ""
    return text or None


def _orientation(ds: Dataset) -> list[str] | None:
    """PatientOrientation (row and column directions, e.g. ['L', 'F']) if the file states it."""
    try:
        value = ds.get("PatientOrientation")
        parts = [str(v).strip().upper() for v in value] if value is not None else []
    except Exception:
        return None
    ok = len(parts) == 2 and all(p and set(p) <= set("LRAPHF") for p in parts)
    return parts if ok else None


def _read_dataset(data: bytes, force: bool) -> Dataset:
    with quiet() as caught:
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
    _check_jp2_boxes(frame)
    size = codestream_size(frame)
    if size is not None and size[0] * size[1] > MAX_PIXELS:
        check_dimensions(*size)
    jpeg = jpeg_frame_header(frame)
    if jpeg is not None:
        check_jpeg_data_size(len(frame), jpeg)


_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def _check_jp2_boxes(frame: bytes) -> None:
    """A JP2-wrapped frame must reach its codestream box through boxes of valid lengths: a box of
    length 0 before it sends pydicom's JP2 parser into an endless loop."""
    if not frame.startswith(_JP2_SIGNATURE):
        return
    pos = 0
    while pos + 8 <= len(frame):
        length, box = struct.unpack(">I4s", frame[pos : pos + 8])
        if box == b"jp2c":
            return
        if length == 1 and pos + 16 <= len(frame):  # 64-bit extended length
            (length,) = struct.unpack(">Q", frame[pos + 8 : pos + 16])
        if length < 8:
            break
        pos += length
    raise UnsupportedImage(UNDECODABLE)


def codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) declared by a JPEG / JPEG-LS SOF or JPEG 2000 SIZ marker, else None."""
    j2k = frame.find(b"\xff\x4f\xff\x51", 0, 4096)
    if j2k >= 0:  # JPEG 2000 codestream, possibly inside a JP2 box wrapper: SOC then SIZ
        try:
            xsiz, ysiz, x0, y0 = struct.unpack(">IIII", frame[j2k + 8 : j2k + 24])
        except struct.error:
            return None
        return ysiz - y0, xsiz - x0
    jpeg = jpeg_frame_header(frame)
    return None if jpeg is None else (jpeg.rows, jpeg.columns)
