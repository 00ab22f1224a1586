"""Window/level: raw DICOM values to display values in [0, 1] (shared by the loader and the UI)."""

from __future__ import annotations

import numpy as np

_FLOAT32_MAX = float(np.finfo(np.float32).max) / 4  # room for center +- width / 2


def apply_window(raw: np.ndarray, center: float, width: float, invert: bool) -> np.ndarray:
    """Window ``raw`` to float32 [0, 1] with the DICOM LINEAR VOI function (PS3.3 C.11.2.1.2.1).

    Values at or below ``center - 0.5 - (width - 1) / 2`` map to 0, above ``center - 0.5 +
    (width - 1) / 2`` to 1. DICOM requires width >= 1, so smaller widths are treated as 1 (a hard
    threshold at ``center - 0.5``). ``invert`` flips the result (MONOCHROME1: low values are white).
    """
    raw32 = np.asarray(raw, dtype=np.float32)
    center = float(center)
    width = max(float(width), 1.0)
    # Finite in float32, where the arithmetic is done (1e308 is finite only in float64).
    if not (abs(center) < _FLOAT32_MAX and width < _FLOAT32_MAX):
        raise ValueError("window center and width must be finite float32 numbers")
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
