"""DICOM display transforms (PS3.3 C.11 / PS3.4 N.2): stored values -> modality LUT (rescale) =
``raw`` -> VOI LUT or window -> ``pixels`` in [0, 1]; colour images -> luminance."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from inference.checks import UnsupportedImage, check_finite, check_not_blank
from inference.dicom_header import header_str, quiet
from inference.windowing import apply_window, percentile_window

FLOAT32_MAX = float(np.finfo(np.float32).max) / 4  # room for center +- width / 2
BAD_MODALITY_LUT = (
    "The DICOM file's rescale values or Modality LUT are damaged, so its pixel values cannot be "
    "interpreted."
)
UNDECODABLE = (
    "The image data in this DICOM file could not be decoded; the file may be damaged or incomplete."
)


def monochrome(arr: np.ndarray, ds: Dataset) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """raw (modality LUT applied), un-inverted pixels in [0, 1], default window."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():  # float pixel data can hold NaN/inf
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    try:
        with quiet():
            rescaled = apply_modality_lut(arr, ds)
    except Exception as exc:  # a malformed Modality LUT Sequence or rescale values
        raise UnsupportedImage(BAD_MODALITY_LUT) from exc
    with np.errstate(over="ignore", invalid="ignore"):
        raw = np.asarray(rescaled, dtype=np.float32)
    del rescaled
    check_finite(raw, "image after its rescale (modality LUT)")
    check_not_blank(raw)

    header_window = _header_window(ds)
    window = header_window or percentile_window(raw)
    pixels = _voi_lut_pixels(raw, ds)
    if pixels is None:
        function = header_str(ds, "VOILUTFunction") or "LINEAR"
        if header_window is not None and function == "SIGMOID":
            center, width = header_window
            pixels = (1.0 / (1.0 + np.exp(-4.0 * (raw - center) / width))).astype(np.float32)
        else:
            # LINEAR_EXACT differs from LINEAR by half a stored value: not visible, not handled.
            pixels = apply_window(raw, *window, invert=False)
    check_finite(pixels)
    return raw, pixels, window


def _header_window(ds: Dataset) -> tuple[float, float] | None:
    """The first (center, width) from the header, if valid; width clamped to DICOM's >= 1."""
    try:
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is None or width is None:
            return None
        center = float(center[0] if isinstance(center, MultiValue) else center)
        width = float(width[0] if isinstance(width, MultiValue) else width)
    except Exception:  # a malformed window (bad numbers, unknown VR) is ignored: we compute one
        return None
    # Finite in float32, where the window is applied (1e308 is finite only in float64).
    if not (abs(center) < FLOAT32_MAX and 0 < width < FLOAT32_MAX):
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
        with quiet():
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


def colour(
    arr: np.ndarray, ds: Dataset, photometric: str, rows: int, columns: int
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Colour (secondary capture) images: luminance, full-range window so raw re-windows alike."""
    if photometric == "PALETTE COLOR":
        with quiet():
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
