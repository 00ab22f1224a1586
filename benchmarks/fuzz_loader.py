"""Fuzz the upload path: mutated real files through ``inference.isolation.load_xray_isolated``.

Seeds are real: the bundled sample PNGs, one of them as JPEG, and the RG1 chest radiograph from
pydicom-data (uncompressed at full size, JPEG 2000 lossless, and an uncompressed 256 x 256
copy so that most DICOM cases decode fast). Each case is one seed with one mutation:

- bytes: bit flips, truncation, a range overwritten with 0x00 / 0xFF / noise, a chunk repeated;
- DICOM header: inconsistent Rows / Columns / BitsAllocated / BitsStored / SamplesPerPixel /
  PhotometricInterpretation / NumberOfFrames, a transfer syntax that does not match the data,
  pixel data cut short;
- PNG header: zero and huge width / height (with a valid CRC), and a decompression bomb
  (30,000 x 30,000 declared, about a megabyte on disk).

Every case must end in an ``XRay`` or ``UnsupportedImage`` (any other exception is a failure),
within the isolation budget (``INFMAP_DECODE_SECONDS``): the wall time of each case is kept, so
"none hangs" is measured, not assumed. ``tests/test_fuzz_loader.py`` runs a small fixed-seed
batch and a hypothesis property over the same mutations; the long run is this script:

    .venv/bin/python -m benchmarks.fuzz_loader --cases 3000 --seed 1 \
        --out benchmarks/results/fuzz_loader.json
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

import settings
from inference.checks import UnsupportedImage
from inference.isolation import load_xray_isolated

Mutation = Callable[[bytes, np.random.Generator], bytes]


# ------------------------------------------------------------------------------------- seeds
def seeds() -> dict[str, bytes]:
    """Real files to mutate, by a short name (PNG, JPEG, DICOM)."""
    sys.path.insert(0, str(settings.REPO_ROOT / "tests"))
    from dicom_samples import pydicom_data_file  # the tests' locator of pydicom-data's files

    out: dict[str, bytes] = {}
    pngs = [sorted(folder.glob("*.png"))[0]
            for folder in sorted(Path(settings.SAMPLES_DIR).iterdir()) if folder.is_dir()]
    for path in pngs:  # one per class folder
        out[f"png:{path.parent.name}"] = path.read_bytes()
    image = cv2.imread(str(pngs[0]), cv2.IMREAD_GRAYSCALE)
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    out["jpeg"] = jpeg.tobytes()
    rg1 = pydicom_data_file("RG1_UNCR.dcm")
    out["dicom:rg1"] = rg1.read_bytes()
    out["dicom:rg1-j2k"] = pydicom_data_file("RG1_J2KR.dcm").read_bytes()
    out["dicom:rg1-small"] = _small_dicom(rg1)
    return out


def _small_dicom(path: Path, side: int = 256) -> bytes:
    """RG1 resampled to ``side`` x ``side``, uncompressed: the same header, fast to decode."""
    ds = pydicom.dcmread(path)
    small = cv2.resize(ds.pixel_array, (side, side), interpolation=cv2.INTER_AREA)
    ds.PixelData = small.astype(np.uint16).tobytes()
    ds.Rows = ds.Columns = side
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --------------------------------------------------------------------------------- mutations
def flip_bits(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    for pos in rng.integers(0, len(out), size=int(rng.integers(1, 64))):
        out[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def truncate(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def overwrite(data: bytes, rng: np.random.Generator) -> bytes:
    start = int(rng.integers(0, len(data)))
    n = int(rng.integers(1, max(2, min(4096, len(data) - start))))
    fill = rng.choice([b"\x00" * n, b"\xff" * n, rng.bytes(n)])
    return data[:start] + fill + data[start + n:]


def repeat_chunk(data: bytes, rng: np.random.Generator) -> bytes:
    start = int(rng.integers(0, len(data)))
    chunk = data[start : start + int(rng.integers(1, 2048))]
    return data[:start] + chunk * int(rng.integers(2, 8)) + data[start:]


_DICOM_FIELDS: dict[str, list[object]] = {
    "Rows": [0, 1, 7, 65535],
    "Columns": [0, 1, 7, 65535],
    "BitsAllocated": [1, 8, 12, 32, 64],
    "BitsStored": [0, 1, 17, 40],
    "HighBit": [0, 31],
    "SamplesPerPixel": [0, 3, 4],
    "PhotometricInterpretation": ["RGB", "YBR_FULL", "PALETTE COLOR", "MONOCHROME1", "JUNK"],
    "NumberOfFrames": [0, 2, 1000],
    "PixelRepresentation": [1, 7],
}
_SYNTAXES = [JPEGBaseline8Bit, JPEG2000Lossless, RLELossless, DeflatedExplicitVRLittleEndian,
             "1.2.840.10008.1.2.4.999", ExplicitVRLittleEndian]


def dicom_header(data: bytes, rng: np.random.Generator) -> bytes:
    """One or two image-pixel attributes set to values that contradict the pixel data."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception:  # the seed was a PNG / JPEG: fall back to bytes
        return flip_bits(data, rng)
    for key in rng.choice(list(_DICOM_FIELDS), size=int(rng.integers(1, 3)), replace=False):
        values = _DICOM_FIELDS[str(key)]
        setattr(ds, str(key), values[int(rng.integers(0, len(values)))])
    return _save(ds)


def dicom_syntax(data: bytes, rng: np.random.Generator) -> bytes:
    """A transfer syntax that does not match how the pixel data is stored: the file meta
    rewritten, the data set's bytes left as they are (pydicom would refuse to write it)."""
    if data[128:132] != b"DICM":
        return truncate(data, rng)
    meta = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta
    group_length = struct.unpack("<I", data[140:144])[0]  # (0002,0000) UL, explicit VR
    body = data[144 + group_length:]
    meta.TransferSyntaxUID = _SYNTAXES[int(rng.integers(0, len(_SYNTAXES)))]
    buf = io.BytesIO()
    buf.write(data[:132])
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue() + body


def dicom_short_pixels(data: bytes, rng: np.random.Generator) -> bytes:
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        pixels = ds.PixelData
    except Exception:
        return truncate(data, rng)
    ds.PixelData = pixels[: int(rng.integers(0, len(pixels)))]
    return _save(ds)


def _save(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))


def png_dimensions(data: bytes, rng: np.random.Generator) -> bytes:
    """IHDR width/height rewritten (0, 1, huge) with a valid CRC: the decoder believes them."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return overwrite(data, rng)
    ihdr = bytearray(data[16:29])
    choices = [0, 1, 3, 30000, 2**31 - 1]
    ihdr[0:4] = struct.pack(">I", choices[int(rng.integers(0, len(choices)))])
    ihdr[4:8] = struct.pack(">I", choices[int(rng.integers(0, len(choices)))])
    return data[:8] + _png_chunk(b"IHDR", bytes(ihdr)) + data[33:]


def png_bomb(data: bytes, rng: np.random.Generator, side: int = 30000) -> bytes:
    """A valid grey PNG that declares ``side`` x ``side`` pixels: about 1 MB on disk, 900 MB
    decoded (the seed is ignored)."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0,
                                                                     0, 0, 0))
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


MUTATIONS: dict[str, Mutation] = {
    "flip_bits": flip_bits, "truncate": truncate, "overwrite": overwrite,
    "repeat_chunk": repeat_chunk, "dicom_header": dicom_header, "dicom_syntax": dicom_syntax,
    "dicom_short_pixels": dicom_short_pixels, "png_dimensions": png_dimensions,
}
_BYTES = ["flip_bits", "truncate", "overwrite", "repeat_chunk"]
_FOR_KIND = {"png": [*_BYTES, "png_dimensions"], "jpeg": _BYTES,
             "dicom": [*_BYTES, "dicom_header", "dicom_syntax", "dicom_short_pixels"]}


def mutations_for(seed_name: str) -> list[str]:
    """The mutations that apply to a seed ("png:...", "jpeg", "dicom:...")."""
    return _FOR_KIND[seed_name.split(":")[0]]


# ------------------------------------------------------------------------------------ the run
@dataclass
class Outcome:
    seed: str
    mutation: str
    result: str  # "xray", "unsupported" or "ERROR: <type>"
    seconds: float


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        results = Counter(o.result for o in self.outcomes)
        seconds = [o.seconds for o in self.outcomes]
        return {
            "cases": len(self.outcomes),
            "results": dict(results),
            "errors": sum(n for r, n in results.items() if r.startswith("ERROR")),
            "by_mutation": {m: dict(Counter(o.result for o in self.outcomes if o.mutation == m))
                            for m in sorted({o.mutation for o in self.outcomes})},
            "max_seconds": round(max(seconds, default=0.0), 3),
            "slowest": [(o.seed, o.mutation, o.result, round(o.seconds, 2))
                        for o in sorted(self.outcomes, key=lambda o: -o.seconds)[:5]],
            "p95_seconds": round(float(np.percentile(seconds, 95)) if seconds else 0.0, 3),
            "budget_seconds": settings.decode_seconds(),
        }


def load_outcome(data: bytes) -> str:
    """What the upload path makes of ``data``: "xray", "unsupported" or "ERROR: <type>"."""
    try:
        load_xray_isolated(data, "fuzz")
    except UnsupportedImage:
        return "unsupported"
    except Exception as exc:  # the defect this looks for
        return f"ERROR: {type(exc).__name__}"
    return "xray"


def run_case(seed_name: str, data: bytes, mutation: str, rng: np.random.Generator) -> Outcome:
    mutated = png_bomb(data, rng) if mutation == "png_bomb" else MUTATIONS[mutation](data, rng)
    t0 = time.perf_counter()
    result = load_outcome(mutated)
    return Outcome(seed_name, mutation, result, time.perf_counter() - t0)


def run(cases: int, seed: int, progress: bool = False) -> Tally:
    rng = np.random.default_rng(seed)
    files = seeds()
    names = sorted(files)
    # The full-size DICOM seeds decode slowly: most DICOM cases use the small copy.
    weights = np.array([0.15 if n in ("dicom:rg1", "dicom:rg1-j2k") else 1.0 for n in names])
    weights /= weights.sum()
    tally = Tally()
    for i in range(cases):
        name = names[int(rng.choice(len(names), p=weights))]
        applicable = mutations_for(name)
        mutation = ("png_bomb" if i % 500 == 499
                    else applicable[int(rng.integers(0, len(applicable)))])
        tally.outcomes.append(run_case(name, files[name], mutation, rng))
        if progress and (i + 1) % 100 == 0:
            print(f"{i + 1}/{cases}: {tally.summary()['results']}", flush=True)
    return tally


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=3000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=settings.cli_path, default=None, help="JSON summary")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    tally = run(args.cases, args.seed, progress=True)
    summary = {**tally.summary(), "seed": args.seed, "minutes": round((time.perf_counter() - t0)
                                                                      / 60, 1)}
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
