"""The limits every file is held to: size on disk, pixels, proportions, decode time and memory.

The upload limit has one home, ``server.maxUploadSize`` in ``.streamlit/config.toml`` (read
through ``settings.upload_limit_mb``), so the browser, the server and the loader refuse the same
files. The decode budget bounds one file's worker process (``inference.isolation``).
"""

from __future__ import annotations

import settings

# Decompression-bomb guard: refuse before decoding. The largest real chest detectors are ~43x43 cm
# at 0.1 mm (about 18 MP), so 60 MP leaves ample room.
MAX_PIXELS = 60_000_000
MIN_SIDE = 64  # below this there is nothing left to segment (the model works at 256 px)
# Chest detectors and films are 35x43 cm or 43x43 cm (long/short <= 1.23); 5 leaves room for
# scans with wide borders and stitched or test images (1024 x 256), and refuses slivers (a 64 x
# 60000 strip) the model cannot read.
MAX_ASPECT_RATIO = 5.0

MAX_FILE_BYTES = settings.upload_limit_mb() * 1024 * 1024  # Streamlit's megabyte is 2**20 bytes


def decode_memory_bytes() -> int:
    return int(settings.decode_memory_mb() * 2**20)
