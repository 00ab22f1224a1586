"""Seconds per study when masks are corrected by clicks in the real app (issue 14.3).

    python -m benchmarks.click_correction_browser [--max-clicks N] [--target 0.90]

The app (``streamlit run app.py``, shipped model and click-refinement network, a temporary
SQLite file) in real Chromium. The studies are the six bundled samples, which are COVID-QU-Ex
**Test** images with their reference masks: the lung mask of each, and the infection mask of
the two COVID-19 ones. A simulated annotator clicks at the centre of the largest remaining error
(``inference.click_sim``: add where the mask misses the reference, remove where it has too much)
until Dice >= ``--target`` or ``--max-clicks``, then saves a draft. Where to click next is worked
out beside the app with the same network and the same inputs (``inference.click_model``), the
click itself is made in the browser; the mask the app saved is then read from the database and
compared with the reference (and with the mask worked out beside it, which must agree).

Seconds per study: from the correction page showing the mask to the save confirmed, with no
human thinking time (so the app's own latency per click, and a floor for a real annotator).
Writes benchmarks/results/click_correction_browser.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

import settings  # noqa: F401 - sets HF_HUB_OFFLINE before timm loads

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "browser"))
sys.path.insert(0, str(REPO / "tests"))

from browser_helpers import CHROMIUM, CHROMIUM_ARGS, sign_in, start_app, stop_app  # noqa: E402
from correction_helpers import (  # noqa: E402
    BACKGROUND_DRAWN,
    canvas_box,
    choose_tool,
    expect_drawing_layer_empty,
    image_id,
    metric_value,
    model_mask,
    save_draft,
    versions,
    wait_idle,
)
from covid_qu_ex import sample_cases  # noqa: E402

from inference.click_refine import Click  # noqa: E402
from inference.click_sim import next_click  # noqa: E402
from services.masks import dice  # noqa: E402 - per image; two empty masks agree (1.0)

RESULTS = REPO / "benchmarks" / "results" / "click_correction_browser.json"
CANVAS_ROOT = '[class*="correction-canvas"]'
NEW_CANVAS = """([selector, before]) => {
    const el = document.querySelector(selector);
    return el !== null && el.getAttribute('class') !== before;
}"""
TIMEOUT_MS = 120_000
VIEWPORT = {"width": 1600, "height": 1000}


def cases() -> list[tuple[str, str]]:
    """(display name, mask kind): every sample's lungs, the COVID-19 samples' infection."""
    out = []
    for cls, stem in sample_cases():
        out.append((f"{cls}/{stem}.png", "lung"))
        if cls == "COVID-19":
            out.append((f"{cls}/{stem}.png", "infection"))
    return out


def reference(name: str, kind: str) -> np.ndarray:
    path = settings.SAMPLES_DIR / name.replace(".png", f"_{kind}.png")
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 127


def plan(network: Any, pixels: np.ndarray, kind: str, start: np.ndarray, other: np.ndarray,
         truth: np.ndarray, target: float, max_clicks: int) -> tuple[list[Click], np.ndarray]:
    """The clicks the simulated annotator makes, worked out with the app's own refinement."""
    from inference.click_model import refine_mask

    within = None if kind == "lung" else other  # the app bounds infection by the lungs
    truth = truth if within is None else truth & within
    clicks: list[Click] = []
    mask = start.copy()
    other_kind = "infection" if kind == "lung" else "lung"
    while len(clicks) < max_clicks and dice(mask, truth) < target:
        click = next_click(mask, truth)
        if click is None:
            break
        clicks.append(click)
        mask = refine_mask(network, pixels, kind, clicks, {kind: mask, other_kind: other},
                           within)
    return clicks, mask


def correct(page: Any, clicks: list[Click], shape: tuple[int, int]) -> None:
    """Make the clicks on the canvas (the tool switched when the sign changes)."""
    from playwright.sync_api import expect

    tool = None
    h, w = shape
    for click in clicks:
        wanted = "Click: add" if click.positive else "Click: remove"
        if wanted != tool:
            choose_tool(page, wanted)
            tool = wanted
        box = canvas_box(page)
        shown = page.locator(CANVAS_ROOT).first.get_attribute("class")
        page.mouse.click(box["x"] + (click.x + 0.5) / w * box["width"],
                         box["y"] + (click.y + 0.5) / h * box["height"])
        # Each applied click mounts a fresh canvas (its key counts the edits): wait for it and
        # its X-ray, as an annotator waits to see the new mask before clicking again.
        page.wait_for_function(NEW_CANVAS, arg=[CANVAS_ROOT, shown])
        root = page.locator(CANVAS_ROOT).first
        page.wait_for_function(BACKGROUND_DRAWN, arg=root.locator(
            "canvas.dc-background-canvas").element_handle())
        expect_drawing_layer_empty(page)  # the click became part of the mask
        wait_idle(page)
    if clicks:
        expect(metric_value(page, "Changed pixels")).not_to_have_text("0")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from playwright.sync_api import expect, sync_playwright

    from inference.model import load_checkpoint

    network = load_checkpoint(settings.SHIPPED_CLICK_CHECKPOINT)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name, sync_playwright() as pw:
        tmp = Path(tmp_name)
        server = start_app(f"sqlite:///{tmp / 'infmap.sqlite'}", settings.SHIPPED_CHECKPOINT,
                           tmp / "app.log", timeout=180)
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport=VIEWPORT)
            context.set_default_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)
            page = context.new_page()
            page.goto(server.url)  # the first start: schema, model, samples predicted
            expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
            for name, kind in cases():
                study = image_id(server, name)
                pixels = cv2.imread(str(settings.SAMPLES_DIR / name), cv2.IMREAD_GRAYSCALE)
                start = model_mask(server, study, kind)
                other = model_mask(server, study, "infection" if kind == "lung" else "lung")
                truth = reference(name, kind)
                clicks, planned = plan(network, pixels, kind, start, other, truth,
                                       args.target, args.max_clicks)
                page.goto(f"{server.url}/correct?study={study}")
                expect(page.get_by_role("heading", name="Correction")).to_be_visible()
                wait_idle(page)
                sign_in(page, "Bench Clicker", "annotator")
                if kind == "infection":
                    page.get_by_text("Infection mask", exact=True).click()
                    expect(page.get_by_text("Editing the infection mask")).to_be_visible()
                expect(page.locator("canvas.dc-canvas").first).to_be_visible()
                wait_idle(page)
                t0 = time.perf_counter()
                correct(page, clicks, pixels.shape)
                saved_id = save_draft(page)
                seconds = time.perf_counter() - t0
                saved = dict((v.id, m) for v, m in versions(server, study, kind))[saved_id]
                scored = truth if kind == "lung" else truth & other
                row = {
                    "study": name, "kind": kind, "clicks": len(clicks),
                    "dice_start": round(dice(start, scored), 4),
                    "dice_saved": round(dice(saved, scored), 4),
                    "saved_vs_planned_dice": round(dice(saved, planned), 4),
                    "seconds": round(seconds, 2),
                    "seconds_per_click": round(seconds / len(clicks), 2) if clicks else None,
                }
                rows.append(row)
                print(row, flush=True)
            context.close()
        finally:
            browser.close()
            stop_app(server)
    per_click = [r["seconds_per_click"] for r in rows if r["seconds_per_click"] is not None]
    return {
        "target_dice": args.target, "max_clicks": args.max_clicks, "studies": rows,
        "seconds_per_study_median": round(statistics.median(r["seconds"] for r in rows), 2),
        "seconds_per_click_median": round(statistics.median(per_click), 2) if per_click else None,
        "clicks_total": sum(r["clicks"] for r in rows),
        "note": "no human thinking time; the app's own latency from the page to the save",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-clicks", type=int, default=10)
    p.add_argument("--target", type=float, default=0.90)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if not CHROMIUM.exists():
        print(f"needs Debian's chromium at {CHROMIUM}", file=sys.stderr)
        return 2
    summary = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "studies"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
