"""The limits every file is held to: size on disk, pixels, proportions, decode time and memory.

The upload limit has one home, ``server.maxUploadSize`` in ``.streamlit/config.toml`` (megabytes,
as Streamlit reads it; ``STREAMLIT_SERVER_MAX_UPLOAD_SIZE`` overrides it, as for Streamlit), so the
browser, the server and the loader refuse the same files. The decode budget bounds one file's
worker process (``inference.isolation``); ``INFMAP_DECODE_SECONDS`` / ``INFMAP_DECODE_MEMORY_MB``
override the defaults.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

STREAMLIT_CONFIG = Path(__file__).resolve().parent.parent / ".streamlit" / "config.toml"
_STREAMLIT_DEFAULT_UPLOAD_MB = 200  # Streamlit's own default when the option is not set

# Decompression-bomb guard: refuse before decoding. The largest real chest detectors are ~43x43 cm
# at 0.1 mm (about 18 MP), so 60 MP leaves ample room.
MAX_PIXELS = 60_000_000
MIN_SIDE = 64  # below this there is nothing left to segment (the model works at 256 px)
# Chest detectors and films are 35x43 cm or 43x43 cm (long/short <= 1.23); 5 leaves room for
# scans with wide borders and stitched or test images (1024 x 256), and refuses slivers (a 64 x
# 60000 strip) the model cannot read.
MAX_ASPECT_RATIO = 5.0

DEFAULT_DECODE_SECONDS = 60.0  # RG1 (3.6 MP JPEG 2000) decodes in ~1 s on a busy 2-core machine
DEFAULT_DECODE_MEMORY_MB = 2048  # estimated peak of the largest accepted image is ~1.1 GB


def upload_limit_mb(config_path: Path = STREAMLIT_CONFIG) -> int:
    """``server.maxUploadSize`` as Streamlit will apply it (environment, then config.toml)."""
    override = os.environ.get("STREAMLIT_SERVER_MAX_UPLOAD_SIZE")
    if override:
        return int(override)
    try:
        with open(config_path, "rb") as fh:
            config = tomllib.load(fh)
    except FileNotFoundError:
        return _STREAMLIT_DEFAULT_UPLOAD_MB
    return int(config.get("server", {}).get("maxUploadSize", _STREAMLIT_DEFAULT_UPLOAD_MB))


MAX_FILE_BYTES = upload_limit_mb() * 1024 * 1024  # Streamlit counts a megabyte as 2**20 bytes


def decode_seconds() -> float:
    return float(os.environ.get("INFMAP_DECODE_SECONDS") or DEFAULT_DECODE_SECONDS)


def decode_memory_bytes() -> int:
    return int(float(os.environ.get("INFMAP_DECODE_MEMORY_MB") or DEFAULT_DECODE_MEMORY_MB) * 2**20)
