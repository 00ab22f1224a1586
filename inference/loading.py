"""From a file (DICOM, PNG or JPEG) to one display-ready grayscale chest X-ray: ``load_xray``.

Everything the rest of the app sees is an ``XRay``: float32 pixels in [0, 1] with air dark, plus a
small de-identified metadata summary. The DICOM header itself never leaves the loader, patient
names are never read, and the patient ID only leaves as a salted hash (``inference.deid``).
Nothing here logs file names or header values.

Every kind of bad input raises ``UnsupportedImage`` (``inference.checks``) whose text is meant for
the person who uploaded the file. Formats: ``inference.dicom``, ``inference.png_jpeg``; storage
form: ``inference.storage``. Files from outside are decoded in a worker process with a time and
memory budget: ``inference.isolation.load_xray_isolated``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference import png_jpeg
from inference.checks import (
    COULD_NOT_READ,
    OUT_OF_MEMORY,
    UnsupportedImage,
    traceback_summary,
)
from inference.limits import MAX_FILE_BYTES

log = logging.getLogger(__name__)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class XRay:
    """One frontal chest X-ray, decoded and de-identified (see docs/INTERFACES.md)."""

    pixels: np.ndarray  # float32 (H, W) in [0, 1], display-ready, air dark: what the model sees
    raw: np.ndarray | None  # float32 (H, W) after the modality LUT only (DICOM); None for PNG/JPEG
    window: tuple[float, float] | None  # default (center, width) in raw units, DICOM only
    invert: bool  # True for MONOCHROME1 (apply after windowing raw)
    metadata: dict[str, Any]  # de-identified, JSON-serialisable summary
    sha256: str  # of the original file bytes (dedupe key)
    source_name: str  # file name given by the user (never logged)


def load_xray(source: str | Path | bytes, name: str | None = None) -> XRay:
    """Decode a DICOM, PNG or JPEG chest X-ray (path or file bytes) into an ``XRay``.

    A ``str`` is a file path. ``name`` is the user's file name (kept as ``source_name``); by
    default the path's name, or ``"upload"`` for bytes. The format is detected from the content,
    never from the file extension. Raises ``UnsupportedImage`` (with a human message) for anything
    that is not a single frontal chest radiograph we can decode.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        data = _read_file(path)
        source_name = name if name is not None else path.name
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        source_name = name if name is not None else "upload"
    else:
        raise TypeError(f"load_xray expects a path or bytes, not {type(source).__name__}")

    if len(data) == 0:
        raise UnsupportedImage("The file is empty.")
    if len(data) > MAX_FILE_BYTES:
        raise UnsupportedImage(_too_large_file_message(len(data)))

    kind = sniff_format(data)
    if kind == "UNKNOWN":
        raise UnsupportedImage(_unknown_format_message(data))
    try:
        pixels, raw, window, invert, metadata = _decode(data, kind)
    except UnsupportedImage:
        raise
    except MemoryError:
        raise UnsupportedImage(OUT_OF_MEMORY) from None
    except Exception as exc:  # a decoder bug or an input nobody foresaw: never a traceback
        log.error("reading a file failed unexpectedly\n%s", traceback_summary(exc))
        raise UnsupportedImage(COULD_NOT_READ) from None

    return XRay(
        pixels=pixels,
        raw=raw,
        window=window,
        invert=invert,
        metadata=metadata,
        sha256=hashlib.sha256(data).hexdigest(),
        source_name=source_name,
    )


def _decode(data: bytes, kind: str) -> tuple[Any, ...]:
    """(pixels, raw, window, invert, metadata) of a DICOM, PNG or JPEG file."""
    if kind in ("PNG", "JPEG"):
        pixels, metadata = png_jpeg.decode_png_jpeg(data, kind)
        return pixels, None, None, False, metadata
    from inference import dicom  # local import: keeps pydicom off the PNG-only path

    d = dicom.decode_dicom(data, force=kind == "DICOM-NO-PREAMBLE")
    return d.pixels, d.raw, d.window, d.invert, d.metadata


def _read_file(path: Path) -> bytes:
    # Messages deliberately omit the path: file names can carry patient names.
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise UnsupportedImage("The file could not be found or opened.") from exc
    if not path.is_file():
        raise UnsupportedImage("This is not a file (perhaps a folder).")
    if size > MAX_FILE_BYTES:
        raise UnsupportedImage(_too_large_file_message(size))
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UnsupportedImage("The file could not be read.") from exc


def _too_large_file_message(n_bytes: int) -> str:
    return (
        f"The file is too large ({n_bytes / 1024**2:.0f} MB; the limit is "
        f"{MAX_FILE_BYTES / 1024**2:.0f} MB)."
    )


def sniff_format(data: bytes) -> str:
    """'DICOM', 'DICOM-NO-PREAMBLE', 'PNG', 'JPEG' or 'UNKNOWN', from magic bytes only."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "DICOM"
    if data.startswith(_PNG_MAGIC):
        return "PNG"
    if data.startswith(_JPEG_MAGIC):
        return "JPEG"
    # Old or non-conformant DICOM without the 128-byte preamble: the first element is then a
    # group 0002 (file meta) or 0008 (identifying) tag, little or big endian. Text never
    # starts with these bytes.
    if len(data) >= 8 and (
        (data[:2] in (b"\x02\x00", b"\x08\x00") and data[3] == 0)
        or (data[:2] in (b"\x00\x02", b"\x00\x08") and data[2] == 0)
    ):
        return "DICOM-NO-PREAMBLE"
    return "UNKNOWN"


def _unknown_format_message(data: bytes) -> str:
    # Name common look-alikes so the user knows what to do instead.
    what = None
    if data.startswith(b"%PDF"):
        what = "a PDF document"
    elif data[:4] in (b"II*\x00", b"MM\x00*"):
        what = "a TIFF image"
    elif data.startswith((b"GIF87a", b"GIF89a")):
        what = "a GIF image"
    elif data.startswith(b"BM"):
        what = "a BMP image"
    elif data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        what = "a WebP image"
    elif data.startswith(b"PK\x03\x04"):
        what = "a ZIP archive (unpack it and upload the image inside)"
    elif data.startswith(b"\x00\x00\x00\x0cjP  ") or data.startswith(b"\xff\x4f\xff\x51"):
        what = "a standalone JPEG 2000 image"
    if what:
        return (
            f"This file looks like {what}, which is not supported. "
            "Please upload a chest X-ray as DICOM, PNG or JPEG."
        )
    return (
        "This file is not a DICOM, PNG or JPEG image, so it can't be read. "
        "Please upload a chest X-ray in one of these formats."
    )
