"""Loader-test fixtures and helpers shared by test_loading and test_loading_refusals."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from inference.checks import UnsupportedImage
from inference.loading import load_xray


def png_bytes(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


def ramp(rows: int = 200, cols: int = 180) -> np.ndarray:
    yy, xx = np.mgrid[0:rows, 0:cols]
    return (1000 + 10 * xx + 5 * yy).astype(np.uint16)


def expect_refusal(source: bytes | Path, *words: str) -> str:
    with pytest.raises(UnsupportedImage) as info:
        load_xray(source)
    message = str(info.value)
    for word in words:
        assert word.lower() in message.lower(), message
    assert "Traceback" not in message and "pydicom" not in message.lower()
    return message


