"""What decoding in a worker process costs: time per file and memory, against the same decode in
the calling process; and the loader's header estimate against the worker's measured peak.

    python -m benchmarks.isolation_overhead [--repeat N]

Inputs: a 256x256 sample PNG (samples/), the 1955x1841 RG1 DICOM uncompressed and JPEG 2000
(pydicom-data), and a 16-bit RGBA 7740x7740 PNG made here (the issue-17 memory probe: 60 MP).
Times are medians over N runs after one warm-up (which also starts the zygote). Memory: the
worker's peak RSS (``ru_maxrss``, read inside the worker) minus its RSS at fork, i.e. what the
decode itself allocated. Prints a markdown table, writes benchmarks/results/isolation_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import settings  # noqa: F401 - sets HF_HUB_OFFLINE
from inference.isolation import Budget, load_xray_isolated, run_isolated
from inference.loading import load_xray

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "isolation_overhead.json"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def decode_and_measure(source: Path) -> dict[str, int]:
    """Run inside a worker: the decode's own memory growth (peak RSS minus RSS at start)."""
    start = _rss_bytes()
    xray = load_xray(source)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"pixels": int(xray.pixels.size), "grew_bytes": max(peak - start, 0)}


def _estimate_bytes(name: str, pixels: int) -> float:
    """The loader's header estimate for these inputs (see check_memory's callers)."""
    if name.startswith("RG1"):
        return pixels * (2 * 2 + 24)  # 16-bit MONOCHROME DICOM
    if "rgba16" in name:
        return pixels * (4 * 2 + 2 + 8)
    return pixels * (1 + 1 + 8)  # 8-bit gray PNG


def _median_seconds(fn: Any, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def inputs(tmp: Path) -> dict[str, Path]:
    sys.path.insert(0, str(REPO / "tests"))
    import probe_inputs
    from dicom_samples import pydicom_data_file

    rgba = tmp / "rgba16_7740.png"
    if not rgba.is_file():
        rgba.write_bytes(probe_inputs.png_rgba16())
    return {
        "sample PNG 256x256": REPO / "samples" / "Normal" / "normal_1.png",
        "RG1_UNCR.dcm 1955x1841": pydicom_data_file("RG1_UNCR.dcm"),
        "RG1_J2KR.dcm 1955x1841 (JPEG 2000)": pydicom_data_file("RG1_J2KR.dcm"),
        "rgba16 PNG 7740x7740": rgba,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.isolation_overhead")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args(argv)
    import tempfile

    # By its module name, not __main__'s: the worker unpickles the function by reference.
    from benchmarks.isolation_overhead import decode_and_measure as measure

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in inputs(Path(tmp)).items():
            repeat = 2 if "rgba16" in name else args.repeat
            direct = _median_seconds(lambda p=path: load_xray(p), repeat)
            isolated = _median_seconds(lambda p=path: load_xray_isolated(p), repeat)
            measured = run_isolated(measure, path, budget=Budget())
            estimate = _estimate_bytes(name, measured["pixels"])
            rows.append(
                {
                    "input": name,
                    "in_process_ms": round(direct * 1000, 1),
                    "worker_ms": round(isolated * 1000, 1),
                    "overhead_ms": round((isolated - direct) * 1000, 1),
                    "worker_decode_peak_mb": round(measured["grew_bytes"] / 2**20, 1),
                    "header_estimate_mb": round(estimate / 2**20, 1),
                }
            )
    print(
        "| input | in process (ms) | in worker (ms) | overhead (ms) | decode peak (MB) | "
        "estimate (MB) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['input']} | {r['in_process_ms']} | {r['worker_ms']} | {r['overhead_ms']} | "
            f"{r['worker_decode_peak_mb']} | {r['header_estimate_mb']} |"
        )
    RESULTS.write_text(
        json.dumps(
            {
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": f"{platform.machine()} {platform.processor()}".strip(),
                "python": platform.python_version(),
                "repeat": args.repeat,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
