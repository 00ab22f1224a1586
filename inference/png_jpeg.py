"""PNG and JPEG decoding: 8- or 16-bit gray or colour files to float32 gray in [0, 1].

Sizes are checked on the header (PIL reads it without decoding) before OpenCV decodes the pixels.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from inference.checks import UnsupportedImage, check_dimensions, check_memory, check_not_blank
from inference.limits import MAX_PIXELS


def decode_png_jpeg(data: bytes, kind: str) -> tuple[np.ndarray, dict[str, Any]]:
    width, height, orientation = _read_header_with_pil(data, kind)
    if kind == "PNG":
        channels, sample_bytes = _png_layout(data)
    else:
        channels, sample_bytes = _jpeg_layout(data)
    # Peak while decoding: the decoded array, its gray copy in the same depth, then float32 gray
    # and its oriented copy; the float32 result is pickled once more to leave the worker.
    check_memory(height, width, channels * sample_bytes + sample_bytes + 8)

    # IMREAD_UNCHANGED keeps 16-bit depth (and alpha, which we drop); it ignores EXIF
    # orientation, which is applied below from the header PIL already read.
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise UnsupportedImage(
            f"The {kind} image could not be decoded; the file may be damaged or incomplete."
        )
    source_dtype = image.dtype
    channels = 1 if image.ndim == 2 else image.shape[2]
    if source_dtype == np.uint8:
        bits = 8
    elif source_dtype == np.uint16:
        bits = _sixteen_bit_depth(data, kind, image)
    else:
        raise UnsupportedImage(f"The {kind} image has an unsupported pixel type.")

    # To gray in the source depth first: a float32 copy of a colour image is 3-4x larger.
    if channels == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif channels == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)  # alpha dropped
    elif channels == 2:  # gray + alpha
        image = image[:, :, 0]
    elif channels != 1:
        raise UnsupportedImage(f"The {kind} image has {channels} channels; this is not supported.")
    if image.ndim == 3:  # (H, W, 1)
        image = image[:, :, 0]
    gray = image.astype(np.float32)
    del image
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


# PNG IHDR colour type -> channels OpenCV decodes it to (a palette becomes BGR).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


def _png_layout(data: bytes) -> tuple[int, int]:
    """(channels, bytes per sample) OpenCV will decode this PNG to, from IHDR."""
    bit_depth, colour_type = data[24], data[25]
    return _PNG_CHANNELS.get(colour_type, 4), 2 if bit_depth == 16 else 1


def _jpeg_layout(data: bytes) -> tuple[int, int]:
    """(channels, bytes per sample) of this JPEG; refuses one too small for its declared size."""
    frame = jpeg_frame_header(data)
    if frame is None:
        raise UnsupportedImage("The JPEG file is damaged or incomplete and could not be read.")
    check_jpeg_data_size(len(data), frame)
    return frame.components, 1 if frame.precision <= 8 else 2


@dataclass(frozen=True)
class JpegFrame:
    """A JPEG / JPEG-LS start-of-frame header: which coding, sample precision and size."""

    marker: int  # 0xC0..0xCF (SOFn) or 0xF7 (JPEG-LS)
    precision: int
    rows: int
    columns: int
    components: int


# Huffman-coded DCT frames (baseline, extended, progressive): every 8x8 block of the first
# component costs at least one bit (its DC code), so a file smaller than that is damaged.
_HUFFMAN_DCT = (0xC0, 0xC1, 0xC2)


def check_jpeg_data_size(n_bytes: int, frame: JpegFrame) -> None:
    """Refuse a JPEG whose data cannot hold the image its header declares (a forged size)."""
    if frame.marker not in _HUFFMAN_DCT:
        return  # arithmetic, lossless and JPEG-LS coding can be far denser
    blocks = -(-frame.rows // 8) * -(-frame.columns // 8)
    if n_bytes * 8 < blocks:
        raise UnsupportedImage(
            f"The JPEG data is far too small for the {frame.columns} x {frame.rows} image its "
            "header declares; the file is damaged or incomplete."
        )


def jpeg_frame_header(data: bytes) -> JpegFrame | None:
    """The SOF (or JPEG-LS SOF55) header of a JPEG codestream, else None."""
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    try:
        while pos + 4 <= len(data):
            if data[pos] != 0xFF:
                return None
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            # SOF0-SOF15 except DHT (C4), JPG (C8), DAC (CC); SOF55 (F7) is JPEG-LS.
            if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
                precision, rows, columns, components = struct.unpack(
                    ">BHHB", data[pos + 4 : pos + 10]
                )
                return JpegFrame(marker, precision, rows, columns, components)
            (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
            pos += 2 + length
    except (struct.error, IndexError):
        return None
    return None


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
