"""From an uploaded file (DICOM, PNG or JPEG) to one display-ready grayscale chest X-ray.

Everything the rest of the app sees is an ``XRay``: float32 pixels in [0, 1] with air dark, plus a
small de-identified metadata summary. The DICOM header itself never leaves this module, patient
names are never read, and the patient ID only leaves as a salted hash. Nothing here logs file names
or header values (pydicom's own log records are suppressed while we read: ``inference.dicom``).

Every kind of bad input raises ``UnsupportedImage`` whose text is meant for the person who
uploaded the file. DICOM-specific decoding lives in ``inference.dicom``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_PIXELS",
    "MIN_SIDE",
    "UnsupportedImage",
    "XRay",
    "apply_window",
    "load_xray",
    "percentile_window",
    "xray_from_npz_bytes",
    "xray_to_npz_bytes",
]

# Decompression-bomb guard: refuse before decoding. The largest real chest detectors are ~43x43 cm
# at 0.1 mm (about 18 MP), so 60 MP leaves ample room while bounding memory (raw + pixels as
# float32 at 60 MP is ~0.5 GB).
MAX_PIXELS = 60_000_000
MIN_SIDE = 64  # below this there is nothing left to segment (the model works at 256 px)
MAX_FILE_BYTES = 300 * 1024 * 1024  # an uncompressed 16-bit 60 MP image is 120 MB

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
NPZ_FORMAT_VERSION = 1


class UnsupportedImage(ValueError):
    """The one error for bad input; ``str(e)`` is a message for the person who uploaded the file."""


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


# --------------------------------------------------------------------------------------------
# Windowing (shared with the UI)
# --------------------------------------------------------------------------------------------


def apply_window(raw: np.ndarray, center: float, width: float, invert: bool) -> np.ndarray:
    """Window ``raw`` to float32 [0, 1] with the DICOM LINEAR VOI function (PS3.3 C.11.2.1.2.1).

    Values at or below ``center - 0.5 - (width - 1) / 2`` map to 0, above ``center - 0.5 +
    (width - 1) / 2`` to 1. DICOM requires width >= 1, so smaller widths are treated as 1 (a hard
    threshold at ``center - 0.5``). ``invert`` flips the result (MONOCHROME1: low values are white).
    """
    raw32 = np.asarray(raw, dtype=np.float32)
    center = float(center)
    width = max(float(width), 1.0)
    if not (np.isfinite(center) and np.isfinite(width)):
        raise ValueError("window center and width must be finite numbers")
    if width == 1.0:
        out = (raw32 > center - 0.5).astype(np.float32)
    else:
        # In place on one float32 buffer: these images can be tens of megapixels.
        out = raw32 - np.float32(center - 0.5)
        out *= np.float32(1.0 / (width - 1.0))
        out += np.float32(0.5)
        np.clip(out, 0.0, 1.0, out=out)
    if invert:
        np.subtract(np.float32(1.0), out, out=out)
    return out


def percentile_window(raw: np.ndarray, low: float = 0.5, high: float = 99.5) -> tuple[float, float]:
    """A robust default window: maps the ``low``..``high`` percentiles of ``raw`` to 0..1.

    Computed on a strided subsample (~250k values) to stay cheap on large images. With the DICOM
    linear function, center = (lo + hi) / 2 + 0.5 and width = hi - lo + 1 map lo -> 0, hi -> 1.
    """
    step = max(1, int(np.sqrt(raw.size / 250_000)))
    sample = np.asarray(raw[::step, ::step], dtype=np.float64)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.5, 1.0
    lo, hi = np.percentile(sample, [low, high])
    if hi <= lo:  # (almost) constant image: fall back to the full range
        lo, hi = float(sample.min()), float(sample.max())
    return float((lo + hi) / 2.0 + 0.5), float(max(hi - lo + 1.0, 1.0))


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


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
    if kind == "DICOM" or kind == "DICOM-NO-PREAMBLE":
        from inference import dicom  # local import: keeps pydicom off the PNG-only path

        decoded = dicom.decode_dicom(data, force=kind == "DICOM-NO-PREAMBLE")
        pixels, raw, window, invert, metadata = (
            decoded.pixels,
            decoded.raw,
            decoded.window,
            decoded.invert,
            decoded.metadata,
        )
    elif kind in ("PNG", "JPEG"):
        pixels, metadata = _decode_png_jpeg(data, kind)
        raw, window, invert = None, None, False
    else:
        raise UnsupportedImage(_unknown_format_message(data))

    return XRay(
        pixels=pixels,
        raw=raw,
        window=window,
        invert=invert,
        metadata=metadata,
        sha256=hashlib.sha256(data).hexdigest(),
        source_name=source_name,
    )


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


def check_dimensions(rows: int, columns: int) -> None:
    """Refuse images above ``MAX_PIXELS`` or below ``MIN_SIDE`` before anything is decoded."""
    if rows <= 0 or columns <= 0:
        raise UnsupportedImage("The image header gives no valid image size; the file is damaged.")
    if rows * columns > MAX_PIXELS:
        raise UnsupportedImage(
            f"The image is too large ({columns} x {rows} pixels = "
            f"{rows * columns / 1e6:.1f} megapixels; the limit is {MAX_PIXELS / 1e6:.0f} "
            "megapixels)."
        )
    if min(rows, columns) < MIN_SIDE:
        raise UnsupportedImage(
            f"The image is too small ({columns} x {rows} pixels); at least {MIN_SIDE} pixels "
            "on each side are needed."
        )


def check_not_blank(image: np.ndarray) -> None:
    """A constant image cannot be windowed or read by the model."""
    if image.size == 0 or image.min() == image.max():
        raise UnsupportedImage("The image is blank (every pixel has the same value).")


# --------------------------------------------------------------------------------------------
# PNG / JPEG
# --------------------------------------------------------------------------------------------


def _decode_png_jpeg(data: bytes, kind: str) -> tuple[np.ndarray, dict[str, Any]]:
    width, height, orientation = _read_header_with_pil(data, kind)

    # IMREAD_UNCHANGED keeps 16-bit depth (and alpha, which we drop); it ignores EXIF
    # orientation, which is applied below from the header PIL already read.
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise UnsupportedImage(
            f"The {kind} image could not be decoded; the file may be damaged or incomplete."
        )
    source_dtype = image.dtype
    channels = 1 if image.ndim == 2 else image.shape[2]

    gray = image.astype(np.float32)
    if channels == 3:
        gray = cv2.cvtColor(gray, cv2.COLOR_BGR2GRAY)
    elif channels == 4:
        gray = cv2.cvtColor(gray, cv2.COLOR_BGRA2GRAY)  # alpha dropped
    elif channels == 2:  # gray + alpha
        gray = np.ascontiguousarray(gray[:, :, 0])
    elif channels != 1:
        raise UnsupportedImage(f"The {kind} image has {channels} channels; this is not supported.")
    if gray.ndim == 3:  # (H, W, 1)
        gray = gray[:, :, 0]

    if source_dtype == np.uint8:
        bits = 8
    elif source_dtype == np.uint16:
        bits = _sixteen_bit_depth(data, kind, image)
    else:
        raise UnsupportedImage(f"The {kind} image has an unsupported pixel type.")
    gray *= np.float32(1.0 / (2**bits - 1))
    np.clip(gray, 0.0, 1.0, out=gray)
    check_not_blank(gray)

    gray = np.ascontiguousarray(_apply_exif_orientation(gray, orientation), dtype=np.float32)
    metadata = {
        "modality": None,
        "view_position": None,
        "body_part": None,
        "rows": int(gray.shape[0]),
        "columns": int(gray.shape[1]),
        "pixel_spacing": None,
        "photometric_interpretation": "MONOCHROME2" if channels <= 2 else "RGB",
        "transfer_syntax": None,
        "bits_stored": bits,
        "format": kind,
        "patient_hash": None,
    }
    return gray, metadata


def _read_header_with_pil(data: bytes, kind: str) -> tuple[int, int, int]:
    """(width, height, EXIF orientation) from the header; refuses bad sizes before any decoding."""
    try:
        with warnings.catch_warnings():
            # Our own MAX_PIXELS check (stricter) gives the message; silence PIL's warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                check_dimensions(height, width)
                orientation = 1
                # JPEG EXIF sits in the header. For PNG, getexif() may inflate the image data to
                # look for an eXIf chunk, so only ask when there is one.
                if kind == "JPEG" or b"eXIf" in data:
                    orientation = int(img.getexif().get(0x0112, 1) or 1)
    except UnsupportedImage:
        raise
    except Image.DecompressionBombError:
        # PIL refuses headers above ~179 MP before we can ask; read the size ourselves.
        width, height = _png_ihdr_size(data) if kind == "PNG" else (0, 0)
        if width and height:
            check_dimensions(height, width)
        raise UnsupportedImage(
            f"The image is too large (the limit is {MAX_PIXELS / 1e6:.0f} megapixels)."
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error) as exc:
        raise UnsupportedImage(
            f"The {kind} file is damaged or incomplete and could not be read."
        ) from exc
    if kind == "PNG":
        _verify_png(data)
    return width, height, orientation


def _png_ihdr_size(data: bytes) -> tuple[int, int]:
    if len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    return 0, 0


def _verify_png(data: bytes) -> None:
    """Walk the PNG chunks (CRCs, IEND present) without inflating: catches truncated uploads."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except Exception as exc:  # PIL raises several types here (OSError, SyntaxError, ...)
        raise UnsupportedImage(
            "The PNG file is damaged or incomplete (it ends early or a checksum does not match)."
        ) from exc


def _png_significant_bits(data: bytes) -> int | None:
    """The sBIT chunk's gray/red significant bits, if the PNG declares them (before IDAT)."""
    pos = 8
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        if ctype == b"sBIT" and length >= 1:
            return int(data[pos + 8])
        if ctype in (b"IDAT", b"IEND"):
            return None
        pos += 12 + length
    return None


def _sixteen_bit_depth(data: bytes, kind: str, image: np.ndarray) -> int:
    """How many of the 16 bits are used: divide by 2**bits - 1 rather than always 65535.

    16-bit PNGs exported from 10-14-bit detectors often keep the detector range (max 1023..16383);
    dividing by 65535 would give an almost black image. Use the PNG sBIT chunk when present;
    otherwise, if the maximum fits in 12 bits or fewer (clearly below 16), use that bit depth.
    Anything larger is treated as full 16-bit.
    """
    if kind == "PNG":
        sbit = _png_significant_bits(data)
        if sbit is not None and 8 <= sbit <= 16:
            return sbit
    used = int(image.max()).bit_length()
    return max(used, 8) if used <= 12 else 16


def _apply_exif_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate/flip like PIL's ``ImageOps.exif_transpose`` (EXIF tag 0x0112 values 2..8)."""
    if orientation == 2:
        return image[:, ::-1]
    if orientation == 3:
        return image[::-1, ::-1]
    if orientation == 4:
        return image[::-1, :]
    if orientation == 5:
        return image.T
    if orientation == 6:
        return np.rot90(image, -1)  # 90 degrees clockwise
    if orientation == 7:
        return image[::-1, ::-1].T
    if orientation == 8:
        return np.rot90(image, 1)  # 90 degrees counter-clockwise
    return image


# --------------------------------------------------------------------------------------------
# De-identified storage form
# --------------------------------------------------------------------------------------------


def xray_to_npz_bytes(x: XRay) -> bytes:
    """Serialise an ``XRay`` for storage: arrays + de-identified metadata, no DICOM header.

    ``pixels`` are quantised to uint16 (error <= 1/131070, invisible and irrelevant to the model);
    ``raw`` comes back as the exact float32 array so the UI can re-window exactly. Strings are
    stored as numpy unicode arrays so loading never needs pickle.
    """
    arrays: dict[str, np.ndarray] = {
        "format_version": np.array(NPZ_FORMAT_VERSION, dtype=np.int32),
        "pixels": np.round(np.clip(x.pixels, 0.0, 1.0) * 65535.0).astype(np.uint16),
        "invert": np.array(bool(x.invert)),
        "metadata_json": np.array(json.dumps(x.metadata, sort_keys=True, allow_nan=False)),
        "sha256": np.array(x.sha256),
        "source_name": np.array(x.source_name),
    }
    if x.raw is not None:
        arrays["raw"] = _compact_raw(np.asarray(x.raw, dtype=np.float32))
    if x.window is not None:
        arrays["window"] = np.asarray(x.window, dtype=np.float64)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _compact_raw(raw: np.ndarray) -> np.ndarray:
    """Lossless smaller dtype for ``raw``: integer-valued data (almost all DICOM) is stored as
    uint16/int16/int32, which deflates ~10x faster than float32 and comes back bit-identical."""
    if raw.size == 0 or not np.array_equal(raw, np.rint(raw)):
        return raw
    lo, hi = float(raw.min()), float(raw.max())
    for dtype in (np.uint16, np.int16, np.int32):
        info = np.iinfo(dtype)
        # float32 holds integers exactly up to 2**24, so the int32 case round-trips too.
        if info.min <= lo and hi <= info.max:
            return raw.astype(dtype)
    return raw


def xray_from_npz_bytes(b: bytes) -> XRay:
    """Inverse of ``xray_to_npz_bytes``; raises ``UnsupportedImage`` if the blob is damaged."""
    try:
        with np.load(io.BytesIO(b), allow_pickle=False) as npz:
            version = int(npz["format_version"])
            if version != NPZ_FORMAT_VERSION:
                raise UnsupportedImage(f"The stored image uses an unknown format ({version}).")
            pixels = npz["pixels"].astype(np.float32) / np.float32(65535.0)
            raw = npz["raw"].astype(np.float32) if "raw" in npz.files else None
            window = None
            if "window" in npz.files:
                center, width = (float(v) for v in npz["window"])
                window = (center, width)
            return XRay(
                pixels=pixels,
                raw=raw,
                window=window,
                invert=bool(npz["invert"]),
                metadata=json.loads(str(npz["metadata_json"])),
                sha256=str(npz["sha256"]),
                source_name=str(npz["source_name"]),
            )
    except UnsupportedImage:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        raise UnsupportedImage("The stored image data is damaged or in an unknown format.") from exc


def patient_hash(patient_id: str | None) -> str | None:
    """Salted sha256 of a patient ID (hex), or None when there is no ID.

    The salt comes from ``INFMAP_ID_SALT``. The built-in default is for development only: with a
    public salt, common IDs could be recovered by brute force, so deployments must set their own.
    """
    if patient_id is None:
        return None
    pid = str(patient_id).strip()
    if not pid:
        return None
    salt = os.environ.get("INFMAP_ID_SALT") or DEV_ID_SALT
    return hashlib.sha256(f"{salt}\x00{pid}".encode()).hexdigest()


DEV_ID_SALT = "infmap-dev-only-salt-set-INFMAP_ID_SALT-in-production"
