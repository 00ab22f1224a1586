"""Checks every image passes, and the one error for bad input.

``UnsupportedImage`` is raised for anything we refuse; ``str(e)`` is meant for the person who gave
the file. The checks run on header values before anything is decoded (size, proportions, memory)
and on the decoded pixels (finite, not blank).
"""

from __future__ import annotations

import traceback

import numpy as np

from inference.limits import MAX_ASPECT_RATIO, MAX_PIXELS, MIN_SIDE, decode_memory_bytes


class UnsupportedImage(ValueError):
    """The one error for bad input; ``str(e)`` is a message for the person who uploaded the file."""


COULD_NOT_READ = "InfMap could not read this file (an unexpected error occurred while decoding it)."
OUT_OF_MEMORY = (
    "Reading this file needed more memory than one image may use, so it was stopped; the file may "
    "be damaged or far larger than a chest X-ray."
)


def traceback_summary(exc: BaseException) -> str:
    """A traceback for the server log with code locations and the exception type only: messages
    of decoder errors can quote header values (names, IDs)."""
    frames = "".join(traceback.format_list(traceback.extract_tb(exc.__traceback__)))
    return (
        f"Traceback (most recent call last):\n{frames}{type(exc).__module__}.{type(exc).__name__}"
    )


def check_dimensions(rows: int, columns: int) -> None:
    """Refuse sizes above ``MAX_PIXELS``, below ``MIN_SIDE`` or out of proportion, before
    anything is decoded."""
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
    if max(rows, columns) > MAX_ASPECT_RATIO * min(rows, columns):
        raise UnsupportedImage(
            f"The image is {columns} x {rows} pixels, far narrower than a chest X-ray (one side "
            f"may be at most {MAX_ASPECT_RATIO:g} times the other)."
        )


def check_memory(rows: int, columns: int, bytes_per_pixel: float) -> None:
    """Refuse before allocating when decoding ``rows`` x ``columns`` would need more than this
    process's decode budget; ``bytes_per_pixel`` is the decoder's estimated peak per pixel."""
    needed = rows * columns * bytes_per_pixel
    budget = decode_memory_bytes()
    if needed > budget:
        raise UnsupportedImage(
            f"Reading this {columns} x {rows} image would need about {needed / 2**30:.1f} GB of "
            f"memory; the limit for one image is {budget / 2**30:.1f} GB."
        )


def check_finite(image: np.ndarray, what: str = "image") -> None:
    """After a conversion to float32: values that overflowed to inf (or NaN) are refused."""
    if not np.isfinite(image).all():
        raise UnsupportedImage(
            f"The {what} holds values too large to represent (infinite or not a number); the "
            "file's values or display settings are damaged."
        )


def check_not_blank(image: np.ndarray) -> None:
    """A constant image cannot be windowed or read by the model."""
    if image.size == 0 or image.min() == image.max():
        raise UnsupportedImage("The image is blank (every pixel has the same value).")
