"""The crafted inputs of the issue-17 probe, rebuilt from RG1 (pydicom-data) and samples/.

Each function returns file bytes. None of these is stored in the repository: they are made here
so that a reader sees exactly what each one is.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
from dicom_samples import pydicom_data_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.tag import Tag

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
SAMPLE_PNG = SAMPLES / "COVID-19" / "covid_1579.png"


def _save(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def rg1(name: str = "RG1_UNCR.dcm") -> Dataset:
    return pydicom.dcmread(pydicom_data_file(name))


def hanging_j2k_dicom() -> bytes:
    """JPEG 2000 pixel data whose first JP2 box has length 0: pydicom's parser loops forever."""
    ds = rg1("RG1_J2KR.dcm")
    ds.PixelData = encapsulate([b"\0\0\0\x0cjP  \r\n\x87\n" + b"\0" * 16])
    return _save(ds)


def unknown_vr_dicom() -> bytes:
    """WindowCenter (0028,1050) with a VR pydicom does not know: NotImplementedError on access."""
    ds = rg1()
    ds[Tag(0x00281050)] = RawDataElement(Tag(0x00281050), "QQ", 4, b"1000", 0, False, True)
    return _save(ds)


def bad_modality_lut_dicom() -> bytes:
    """A Modality LUT Sequence whose descriptor says 10 entries but whose LUTData has 6 bytes."""
    ds = rg1()
    item = Dataset()
    item.LUTDescriptor = [10, 0, 16]
    item.ModalityLUTType = "HU"
    item.LUTData = b"\x01\x00\x02\x00\x03\x00"
    ds.ModalityLUTSequence = [item]
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        if keyword in ds:
            delattr(ds, keyword)
    return _save(ds)


def huge_window_dicom() -> bytes:
    """WindowCenter/Width 1e308: finite in float64, infinite once in float32."""
    ds = rg1()
    ds.WindowCenter = "1e308"
    ds.WindowWidth = "1e308"
    return _save(ds)


def sample_gray() -> np.ndarray:
    image = cv2.imread(str(SAMPLE_PNG), cv2.IMREAD_GRAYSCALE)
    assert image is not None
    return image


def jpeg_claiming(rows: int = 8000, columns: int = 7000) -> bytes:
    """A small real JPEG whose SOF header claims ``columns`` x ``rows`` (about 11 KB)."""
    ok, buf = cv2.imencode(".jpg", sample_gray(), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    data = bytearray(buf.tobytes())
    pos = 2
    while pos < len(data):
        marker = data[pos + 1]
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if 0xC0 <= marker <= 0xC2:
            data[pos + 5 : pos + 9] = struct.pack(">HH", rows, columns)
            return bytes(data)
        pos += 2 + length
    raise AssertionError("no SOF marker")


def _png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def png_rgba16(side: int = 7740) -> bytes:
    """A 16-bit RGBA PNG of ``side`` x ``side`` (a gradient, so not blank) that deflates to well
    under a megabyte: each row is stored with the Sub filter, whose output repeats."""
    row = np.zeros((side, 4), dtype=">u2")
    row[:, 0] = row[:, 1] = row[:, 2] = (np.arange(side) * 8).astype(np.uint16)
    row[:, 3] = 65535
    raw = np.frombuffer(row.tobytes(), dtype=np.uint8).astype(np.int16)
    sub = raw.copy()
    sub[8:] -= raw[:-8]  # PNG filter 1 (Sub), 8 bytes per pixel
    scanline = b"\x01" + (sub % 256).astype(np.uint8).tobytes()
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(scanline) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def png_of(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


def sliver_png(rows: int = 64, columns: int = 60000) -> bytes:
    """A 64 x 60000 gradient: far outside any chest radiograph's proportions."""
    image = np.tile(np.linspace(0, 255, columns).astype(np.uint8), (rows, 1))
    return png_of(image)


MARKDOWN_INJECTIONS = (
    "![x](http://example.invalid/track.png)",
    "[click here](http://example.invalid/phish)",
    "**bold** _it_ `code` <b>html</b> :material/warning: $x^2$",
)


def decode_pixel_data(data: bytes) -> int:
    """pydicom's own decoding with none of InfMap's checks (reaches the J2K parser's loop)."""
    return int(pydicom.dcmread(io.BytesIO(data)).pixel_array.size)
