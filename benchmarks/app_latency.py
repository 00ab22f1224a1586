"""What a user waits for in the browser: app start to first paint, and upload to the four panels.

    python -m benchmarks.app_latency [--runs N] [--checkpoint PATH]

Real Chromium (Debian's /usr/bin/chromium via Playwright) against ``streamlit run app.py`` on a
temporary SQLite database. Timings, medians over ``--runs``:

- start, fresh database: process start -> worklist table visible, on an empty database (the
  first start: migrations, model registration, six sample cases imported and predicted);
- start, existing database: the same on the database the previous start left (a restart);
- upload PNG: a new 256x256 PNG given to the uploader -> its review page with all four panels
  drawn (load, store, predict, Grad-CAM, overlays, plotly render);
- upload DICOM: the same for the 1955x1841 RG1 CR of pydicom-data (one pixel changed per run so
  each upload is a new study and really runs the model).

Uses models/infmap.pt when present, else a random checkpoint of the default configuration (the
table says which; timings do not depend on the weights). Prints a table and writes
benchmarks/results/app_latency.json.
"""

from __future__ import annotations

import argparse  # noqa: E402
import json  # noqa: E402
import os
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

import settings  # noqa: E402,F401 - sets HF_HUB_OFFLINE before timm loads

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "browser"))
sys.path.insert(0, str(REPO / "tests"))

from browser_helpers import CHROMIUM, CHROMIUM_ARGS, start_app, stop_app  # noqa: E402
from dicom_samples import pydicom_data_file  # noqa: E402

from inference.model import DEFAULT_CHECKPOINT  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "app_latency.json"
TIMEOUT_MS = 180_000
VIEWPORT = {"width": 1600, "height": 1000}


def checkpoint(explicit: str | None, tmp: Path) -> tuple[Path, str]:
    if explicit:
        return Path(explicit), f"given: {explicit}"
    if DEFAULT_CHECKPOINT.is_file():
        return DEFAULT_CHECKPOINT, "models/infmap.pt (trained)"
    from tests.conftest import make_random_checkpoint

    return make_random_checkpoint(tmp / "random.pt"), "random weights (models/infmap.pt absent)"


def png_file(path: Path, seed: int) -> Path:
    """A new 256x256 chest-like PNG (smooth noise): different bytes every run."""
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur((rng.random((256, 256)) * 255).astype(np.uint8), (0, 0), 6)
    image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX)
    cv2.imwrite(str(path), image)
    return path


def dicom_file(path: Path, seed: int) -> Path:
    """RG1_UNCR.dcm with one pixel value changed: a new study (new hash) of the same size."""
    import pydicom

    ds = pydicom.dcmread(pydicom_data_file("RG1_UNCR.dcm"))
    pixels = ds.pixel_array.copy()
    pixels[0, seed % pixels.shape[1]] ^= 1
    ds.PixelData = pixels.tobytes()
    ds.save_as(path)
    return path


def wait_worklist(page: Any) -> None:
    from playwright.sync_api import expect

    expect(page.get_by_role("heading", name="Worklist")).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator('[data-testid="stDataFrame"]').first).to_be_visible(timeout=TIMEOUT_MS)


def time_start(browser: Any, db_url: str, ckpt: Path, log: Path) -> float:
    """Seconds from process start to the worklist table drawn in a new browser page."""
    t0 = time.perf_counter()
    server = start_app(db_url, ckpt, log, timeout=TIMEOUT_MS / 1000)
    try:
        context = browser.new_context(viewport=VIEWPORT)
        page = context.new_page()
        page.goto(server.url)
        wait_worklist(page)
        elapsed = time.perf_counter() - t0
        context.close()
        return elapsed
    finally:
        stop_app(server)


def time_upload(page: Any, base_url: str, file: Path, shots: Path | None) -> float:
    """Seconds from giving the file to the uploader to its four review panels drawn."""
    from playwright.sync_api import expect

    page.goto(base_url)
    wait_worklist(page)
    t0 = time.perf_counter()
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(file))
    expect(page.get_by_text(f"{file.name} added as study")).to_be_visible(timeout=TIMEOUT_MS)
    page.get_by_test_id("stExpander").get_by_role("button", name="Review").click()
    chart = page.locator('[data-testid="stPlotlyChart"]').first
    expect(chart.locator("g.imagelayer image")).to_have_count(4, timeout=TIMEOUT_MS)
    elapsed = time.perf_counter() - t0
    if shots is not None:
        page.screenshot(path=str(shots))
    return elapsed


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "median_s": round(statistics.median(values), 2),
        "min_s": round(min(values), 2),
        "max_s": round(max(values), 2),
        "runs_s": [round(v, 2) for v in values],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--checkpoint", type=settings.cli_path_str, default=None)
    args = parser.parse_args()
    if not CHROMIUM.exists():
        raise SystemExit(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    shots = REPO / "test-output" / "benchmarks"
    shots.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[float]] = {
        "start_fresh_db": [], "start_existing_db": [], "upload_png": [], "upload_dicom": [],
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="infmap-bench-") as tmp_name, sync_playwright() as pw:
        tmp = Path(tmp_name)
        ckpt, ckpt_note = checkpoint(args.checkpoint, tmp)
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            for run in range(args.runs):
                db = f"sqlite:///{tmp / f'run{run}' / 'infmap.sqlite'}"
                log = tmp / f"run{run}.log"
                results["start_fresh_db"].append(time_start(browser, db, ckpt, log))
                results["start_existing_db"].append(time_start(browser, db, ckpt, log))
                print(f"start run {run + 1}: fresh {results['start_fresh_db'][-1]:.1f} s, "
                      f"existing {results['start_existing_db'][-1]:.1f} s", flush=True)  # fmt: skip
            db = f"sqlite:///{tmp / 'uploads' / 'infmap.sqlite'}"
            server = start_app(db, ckpt, tmp / "uploads.log", timeout=TIMEOUT_MS / 1000)
            try:
                context = browser.new_context(viewport=VIEWPORT)
                page = context.new_page()
                page.goto(server.url)
                wait_worklist(page)
                for run in range(args.runs):
                    last = run == args.runs - 1
                    png = png_file(tmp / f"bench_{run}.png", run)
                    results["upload_png"].append(
                        time_upload(
                            page, server.url, png, shots / "upload-png.png" if last else None
                        )
                    )
                    dcm = dicom_file(tmp / f"bench_{run}.dcm", run)
                    results["upload_dicom"].append(
                        time_upload(
                            page, server.url, dcm, shots / "upload-dicom.png" if last else None
                        )
                    )
                    print(f"upload run {run + 1}: PNG {results['upload_png'][-1]:.1f} s, "
                          f"DICOM {results['upload_dicom'][-1]:.1f} s", flush=True)  # fmt: skip
                context.close()
            finally:
                stop_app(server)
        finally:
            browser.close()

    labels = {
        "start_fresh_db": "start -> worklist, fresh database (first start, 6 samples predicted)",
        "start_existing_db": "start -> worklist, existing database (restart)",
        "upload_png": "upload 256x256 PNG -> four panels",
        "upload_dicom": "upload RG1 DICOM 1955x1841 -> four panels",
    }
    report = {
        "benchmark": "app_latency",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "checkpoint": ckpt_note,
        "runs": args.runs,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "browser": str(CHROMIUM),
        },
        "note": "Wall-clock in real Chromium; model training may be running on the same CPUs.",
        "results": {k: {"label": labels[k], **summary(v)} for k, v in results.items()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nCheckpoint: {ckpt_note}; {args.runs} runs; medians (min-max)\n")
    print("| measurement | median s | min-max s |")
    print("|---|---:|---:|")
    for _key, row in report["results"].items():
        print(f"| {row['label']} | {row['median_s']:.2f} | {row['min_s']:.2f}-{row['max_s']:.2f} |")
    print(f"\nWrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
