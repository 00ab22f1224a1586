"""Helpers for the browser tests of the correction page: reading what the app stored, and
drawing on the canvas (mouse strokes and polygons), waiting on what the page shows."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from browser_helpers import AppServer, database_session, sign_in, wait_idle
from playwright.sync_api import Locator, Page, expect
from sqlalchemy.orm import Session

from database import annotation_versions, model_versions, predictions, worklist


# ----------------------------------------------------------------------------- the database
@contextmanager
def read_db(server: AppServer) -> Iterator[Session]:
    """A read-only session on the app server's database (as the app wrote it)."""
    with database_session(server.database_url, write=False) as s:
        yield s


def image_id(server: AppServer, display_name: str) -> int:
    with read_db(server) as s:
        for row in worklist.worklist(s):
            if row.display_name == display_name:
                return row.image_id
    raise AssertionError(f"{display_name} is not in the worklist")


def versions(server: AppServer, image: int, kind: str) -> list[tuple[object, np.ndarray]]:
    with read_db(server) as s:
        return [
            (v, annotation_versions.version_mask(v))
            for v in annotation_versions.list_versions(s, image, kind)
        ]


def model_mask(server: AppServer, image: int, kind: str) -> np.ndarray:
    with read_db(server) as s:
        active = model_versions.get_active_model_version(s)
        lung, infection = predictions.prediction_masks(
            predictions.get_prediction(s, image, active.id)
        )
    return lung if kind == "lung" else infection


# ----------------------------------------------------------------------------- the page
def open_correction(new_page, study: int) -> Page:  # noqa: ANN001
    page = new_page(f"/correct?study={study}")
    expect(page.get_by_role("heading", name="Correction")).to_be_visible()
    return page


def metric_value(page: Page, label: str) -> Locator:
    metric = page.locator('[data-testid="stMetric"]').filter(has_text=label)
    return metric.locator('[data-testid="stMetricValue"]')


def canvas_box(page: Page) -> dict[str, float]:
    canvas = page.locator("canvas.dc-canvas").first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    assert box is not None
    return box


def draw_polygon(page: Page, points: list[tuple[float, float]]) -> None:
    """Click the vertices, then the first one again to close (fractions of the canvas)."""
    box = canvas_box(page)
    for x, y in [*points, points[0]]:
        page.mouse.click(box["x"] + x * box["width"], box["y"] + y * box["height"])
        page.wait_for_timeout(150)  # distinct clicks, not a double click


# Reads a pixel of the correction page's "Result" image (the mask that will be saved, tinted on
# the X-ray) in the browser: gray means no mask there. Lets a test wait for the canvas's final
# state instead of an intermediate one, which the canvas streams while a polygon is drawn.
RESULT_PIXEL_IS_GRAY = """([fx, fy]) => {
    const box = [...document.querySelectorAll('[data-testid="stImage"]')]
        .find((el) => el.textContent.includes('Result'));
    const img = box && box.querySelector('img');
    if (!img || !img.complete || !img.naturalWidth) return false;
    const c = document.createElement('canvas');
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    const ctx = c.getContext('2d');
    ctx.drawImage(img, 0, 0);
    const x = Math.floor(fx * c.width), y = Math.floor(fy * c.height);
    const [r, g, b] = ctx.getImageData(x, y, 1, 1).data;
    return Math.max(r, g, b) - Math.min(r, g, b) < 12;
}"""


def wait_result_gray_at(page: Page, fx: float, fy: float) -> None:
    page.wait_for_function(RESULT_PIXEL_IS_GRAY, arg=[fx, fy])


def draw_stroke(page: Page, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Mouse down, move in steps, mouse up on the drawing canvas (fractions of its size)."""
    box = canvas_box(page)
    x0, y0 = box["x"] + start[0] * box["width"], box["y"] + start[1] * box["height"]
    x1, y1 = box["x"] + end[0] * box["width"], box["y"] + end[1] * box["height"]
    page.mouse.move(x0, y0)
    page.mouse.down()
    for i in range(1, 21):
        page.mouse.move(x0 + (x1 - x0) * i / 20, y0 + (y1 - y0) * i / 20)
    page.mouse.up()
    expect(metric_value(page, "Changed pixels")).not_to_have_text("0")


# The drawing layer of the canvas (background not included) has no painted pixel: every shape
# has been committed into the mask the app shows under it, none is left only on the canvas.
DRAWING_LAYER_IS_EMPTY = """(el) => {
    const data = el.getContext('2d').getImageData(0, 0, el.width, el.height).data;
    for (let i = 3; i < data.length; i += 4) if (data[i] > 0) return false;
    return true;
}"""


def expect_drawing_layer_empty(page: Page) -> None:
    canvas = page.locator("canvas.dc-canvas").first
    expect(canvas).to_be_visible()
    page.wait_for_function(
        "(el) => (" + DRAWING_LAYER_IS_EMPTY + ")(el)", arg=canvas.element_handle()
    )


def app_button(page: Page, key: str) -> Locator:
    """A Streamlit button by its key (the canvas toolbar has icon buttons of the same names)."""
    wait_idle(page)  # not a stale copy of the button from the run before
    return page.locator(f".st-key-{key.replace('.', '-')} button:visible")


def save_draft(page: Page) -> int:
    """Click Save draft and return the new version's id from its confirmation (not from the
    confirmation of the save before, which may still be on the page while this one runs)."""
    confirmation = re.compile(r"Draft saved: \w+ mask version (\d+)")
    message = page.get_by_text(confirmation)
    wait_idle(page)
    before = message.all_inner_texts()
    page.get_by_role("button", name="Save draft").click()
    newer = message
    if before:
        newer = message.filter(has_not_text=re.compile("|".join(map(re.escape, before))))
    expect(newer).to_have_count(1)
    return int(confirmation.search(newer.inner_text()).group(1))


def choose_tool(page: Page, label: str) -> None:
    """Pick a drawing tool and wait for the canvas that draws with it (the page keys the
    canvas by tool), so that no click lands on the canvas of the tool before."""
    page.get_by_text(label, exact=True).click()
    slug = label.lower().replace(": ", "-")
    root = page.locator(f'[class*="correction-canvas"][class*="-tool-{slug}"]').first
    expect(root.locator("canvas.dc-canvas").first).to_be_visible()
    # The new canvas takes its tool once loaded; its X-ray is drawn after that (and its size
    # report reruns the page): wait for the X-ray, then for that run.
    page.wait_for_function(BACKGROUND_DRAWN, arg=root.locator("canvas.dc-background-canvas")
                           .element_handle())
    wait_idle(page)


BACKGROUND_DRAWN = """(el) => {
    const d = el.getContext('2d').getImageData(0, 0, el.width, el.height).data;
    for (let i = 3; i < d.length; i += 4 * 97) if (d[i] > 0) return true;
    return false;
}"""


def edit_infection(page: Page, who: str) -> None:
    """Sign in as annotator ``who`` and switch the editor to the infection mask."""
    sign_in(page, who, "annotator")
    page.get_by_text("Infection mask", exact=True).click()
    expect(page.get_by_text("Editing the infection mask")).to_be_visible()
    wait_idle(page)
