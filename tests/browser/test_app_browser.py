"""The app in real Chromium: upload, review panels, drawing corrections, bad input, conflicts.

Each test works on its own study so the order does not matter; the database is inspected
through the database modules, exactly as the app wrote it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from browser_helpers import AppServer, go_to, sign_in, wait_idle
from dicom_samples import pydicom_data_file
from playwright.sync_api import Locator, Page, expect

from database import annotation_versions, model_versions, predictions, worklist
from database.session import make_engine, session_scope

pytestmark = pytest.mark.browser


# ----------------------------------------------------------------------------- helpers
def image_id(server: AppServer, display_name: str) -> int:
    engine = make_engine(server.database_url)
    try:
        with session_scope(engine, write=False) as s:
            for row in worklist.worklist(s):
                if row.display_name == display_name:
                    return row.image_id
    finally:
        engine.dispose()
    raise AssertionError(f"{display_name} is not in the worklist")


def versions(server: AppServer, image: int, kind: str) -> list[tuple[object, np.ndarray]]:
    engine = make_engine(server.database_url)
    try:
        with session_scope(engine, write=False) as s:
            return [
                (v, annotation_versions.version_mask(v))
                for v in annotation_versions.list_versions(s, image, kind)
            ]
    finally:
        engine.dispose()


def model_mask(server: AppServer, image: int, kind: str) -> np.ndarray:
    engine = make_engine(server.database_url)
    try:
        with session_scope(engine, write=False) as s:
            active = model_versions.get_active_model_version(s)
            lung, infection = predictions.prediction_masks(
                predictions.get_prediction(s, image, active.id)
            )
    finally:
        engine.dispose()
    return lung if kind == "lung" else infection


def upload(page: Page, *files: Path) -> None:
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(
        [str(f) for f in files]
    )


def panels(page: Page) -> Locator:
    return page.locator('[data-testid="stPlotlyChart"]').first


def expect_four_panels(page: Page) -> None:
    chart = panels(page)
    expect(chart.locator("g.imagelayer image")).to_have_count(4)
    for title in ("X-ray", "Lung mask", "Infection mask", "Grad-CAM"):
        expect(chart.get_by_text(title, exact=False).first).to_be_visible()


def expect_probabilities(page: Page) -> None:
    expect(page.get_by_role("heading", name="Class probabilities")).to_be_visible()
    bars = page.locator('[data-testid="stPlotlyChart"]').nth(1)
    for name in ("COVID-19", "Non-COVID", "Normal"):
        expect(bars.get_by_text(name, exact=True).first).to_be_visible()
    expect(page.get_by_text(re.compile(r"Predicted: .+ \(\d+\.\d%\)"))).to_be_visible()


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


# ----------------------------------------------------------------------------- tests
def test_upload_dicom_shows_four_panels_and_probabilities(new_page, shot, app_server) -> None:
    page = new_page()
    expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
    expect(page.get_by_text("normal_1.png").first).to_be_attached()  # the samples (grid cell)
    shot(page, "worklist")

    upload(page, pydicom_data_file("RG1_UNCR.dcm"))
    expect(page.get_by_text(re.compile(r"RG1_UNCR\.dcm added as study #\d+"))).to_be_visible()
    shot(page, "uploaded")

    page.get_by_test_id("stExpander").get_by_role("button", name="Review").click()
    expect(page.get_by_role("heading", name="Review")).to_be_visible()
    expect_four_panels(page)
    expect_probabilities(page)
    expect(page.get_by_text("Decision support only").first).to_be_visible()
    expect(page.get_by_text("Window preset")).to_be_visible()  # DICOM: window/level offered
    shot(page, "review-dicom")

    # Zoom in the X-ray panel: the Grad-CAM panel follows (matched axes).
    plot = panels(page).locator(".js-plotly-plot").element_handle()
    width = "(el, a) => el._fullLayout[a].range[1] - el._fullLayout[a].range[0]"
    full = page.evaluate(f"([el, a]) => ({width})(el, a)", [plot, "xaxis4"])
    box = panels(page).locator("g.imagelayer image").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(3):
        page.mouse.wheel(0, -200)
    page.wait_for_function(
        f"([el, full]) => ({width})(el, 'xaxis4') < 0.9 * full", arg=[plot, full]
    )
    # Another window re-renders all panels from the stored raw pixels (no model run).
    first = panels(page).locator("g.imagelayer image").first
    before = first.get_attribute("href")
    select = page.locator('[data-testid="stSelectbox"]').filter(has_text="Window preset")
    select.click()
    page.get_by_role("option", name="Lung", exact=True).click()
    expect(page.get_by_text(re.compile(r"Centre \d+, width \d+ \(raw units\)"))).to_be_visible()
    expect(first).not_to_have_attribute("href", before)
    expect(panels(page).locator("g.imagelayer image")).to_have_count(4)
    shot(page, "review-dicom-lung-window")
    page.get_by_role("heading", name="Class probabilities").scroll_into_view_if_needed()
    shot(page, "review-dicom-facts")


def test_draw_on_canvas_and_save_creates_version(new_page, shot, app_server) -> None:
    study = image_id(app_server, "Normal/normal_1.png")
    page = open_correction(new_page, study)
    sign_in(page, "Alice Annotator", "annotator")
    expect(page.locator("canvas.dc-canvas").first).to_be_visible()
    shot(page, "correction")

    draw_stroke(page, (0.2, 0.3), (0.8, 0.7))
    shot(page, "drawn")
    changed = metric_value(page, "Changed pixels").inner_text()
    page.get_by_text("Polygon: erase").click()
    wait_idle(page)  # the canvas must have switched tools before the first click
    draw_polygon(page, [(0.4, 0.4), (0.6, 0.4), (0.6, 0.6), (0.4, 0.6)])  # cuts the stroke
    expect(metric_value(page, "Changed pixels")).not_to_have_text(changed)
    wait_result_gray_at(page, 0.5, 0.5)  # the closed polygon, not a half-drawn one, is applied
    wait_idle(page)
    shot(page, "polygon-erased")
    page.get_by_role("button", name="Save draft").click()
    expect(page.get_by_text(re.compile(r"Draft saved: lung mask version \d+"))).to_be_visible()
    shot(page, "saved")

    saved = versions(app_server, study, "lung")
    assert len(saved) == 1
    version, mask = saved[0]
    assert version.author.name == "Alice Annotator"
    assert version.status == "draft" and not version.conflict
    model = model_mask(app_server, study, "lung")
    assert (mask ^ model).sum() > 100  # the stroke is in it
    h, w = mask.shape
    on_stroke = (round(0.3 * h + 0.05 * 0.4 / 0.6 * h), round(0.25 * w))
    assert mask[on_stroke] and not model[on_stroke]  # added by the brush
    assert not mask[h // 2, w // 2]  # removed again by the polygon
    expect(page.get_by_text("Alice Annotator (annotator)").first).to_be_visible()  # history


def test_bad_file_gives_clear_error_and_app_keeps_working(
    new_page, shot, app_server, tmp_path: Path
) -> None:
    fake = tmp_path / "notes.dcm"
    fake.write_text("These are my notes, not an X-ray.\n" * 20)
    page = new_page()
    expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
    upload(page, fake)
    error = page.locator('[data-testid="stAlert"]').filter(has_text="notes.dcm was not added")
    expect(error).to_be_visible()
    assert len(error.inner_text().split("not added:", 1)[1].strip()) > 10  # a reason is given
    expect(page.get_by_text("Traceback")).to_have_count(0)
    shot(page, "bad-file")

    page.get_by_role("button", name="Next study to review").click()
    expect(page.get_by_role("heading", name="Review")).to_be_visible()
    expect_four_panels(page)
    shot(page, "then-review")


def test_concurrent_saves_refuse_the_stale_one_and_keep_it(new_page, shot, app_server) -> None:
    study = image_id(app_server, "Normal/normal_10.png")
    ann, bob = open_correction(new_page, study), open_correction(new_page, study)
    sign_in(ann, "Ann Concurrent", "annotator")
    sign_in(bob, "Bob Concurrent", "radiologist")
    draw_stroke(ann, (0.1, 0.2), (0.5, 0.3))
    draw_stroke(bob, (0.5, 0.6), (0.9, 0.8))

    ann.get_by_role("button", name="Save draft").click()
    expect(ann.get_by_text(re.compile(r"Draft saved: lung mask version \d+"))).to_be_visible()
    shot(ann, "ann-saved")

    bob.get_by_role("button", name="Save draft").click()
    refusal = bob.locator('[data-testid="stAlert"]').filter(
        has_text=re.compile(r"Ann Concurrent saved a newer lung mask .* at \d{4}-\d\d-\d\d")
    )
    expect(refusal).to_be_visible()
    expect(bob.get_by_text(re.compile(r"saved as your draft version \d+"))).to_be_visible()
    shot(bob, "bob-refused")

    saved = versions(app_server, study, "lung")
    assert [(v.author.name, v.conflict) for v, _ in saved] == [
        ("Ann Concurrent", False),
        ("Bob Concurrent", True),
    ]
    (_, ann_mask), (bob_version, bob_mask) = saved
    assert bob_version.status == "draft"
    model = model_mask(app_server, study, "lung")
    assert (bob_mask ^ model).sum() > 100 and (bob_mask ^ ann_mask).sum() > 100  # nothing lost

    bob.get_by_role("button", name="Continue from my draft").click()
    expect(bob.get_by_text(f"starting from version {bob_version.id}")).to_be_visible()
    shot(bob, "bob-merging")
    go_to(bob, "Worklist")
    expect(bob.get_by_role("heading", name="Worklist")).to_be_visible()


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
    """Click Save draft and return the new version's id from the confirmation."""
    wait_idle(page)
    page.get_by_role("button", name="Save draft").click()
    message = page.get_by_text(re.compile(r"Draft saved: \w+ mask version \d+"))
    expect(message).to_be_visible()
    return int(re.search(r"version (\d+)", message.inner_text()).group(1))


def test_undo_redo_clear_are_what_is_saved_pixel_by_pixel(new_page, shot, app_server) -> None:
    """Issue 16.1: brush, polygon, undo, redo, clear on the infection mask; after each the
    stored mask is exactly the one the page had shown for that state."""
    study = image_id(app_server, "Non-COVID/non_covid_11905.png")
    page = open_correction(new_page, study)
    sign_in(page, "Una Undo", "annotator")
    page.get_by_text("Infection mask", exact=True).click()
    expect(page.get_by_text("Editing the infection mask")).to_be_visible()
    wait_idle(page)

    draw_stroke(page, (0.2, 0.3), (0.45, 0.35))
    expect_drawing_layer_empty(page)
    after_stroke = metric_value(page, "Changed pixels").inner_text()
    a = save_draft(page)

    page.get_by_text("Polygon: add").click()
    wait_idle(page)
    draw_polygon(page, [(0.55, 0.55), (0.8, 0.55), (0.8, 0.8), (0.55, 0.8)])
    expect(metric_value(page, "Changed pixels")).not_to_have_text(after_stroke)
    expect_drawing_layer_empty(page)
    after_polygon = metric_value(page, "Changed pixels").inner_text()
    shot(page, "polygon")
    b = save_draft(page)

    app_button(page, "correction.undo").click()
    expect(metric_value(page, "Changed pixels")).to_have_text(after_stroke)
    expect_drawing_layer_empty(page)
    shot(page, "undone")
    c = save_draft(page)

    app_button(page, "correction.redo").click()
    expect(metric_value(page, "Changed pixels")).to_have_text(after_polygon)
    d = save_draft(page)

    app_button(page, "correction.clear").click()
    expect(metric_value(page, "Changed pixels")).to_have_text("0")
    e = save_draft(page)
    shot(page, "cleared")

    saved = {v.id: mask for v, mask in versions(app_server, study, "infection")}
    assert sorted(saved) == [a, b, c, d, e]
    model = model_mask(app_server, study, "infection")
    assert (saved[a] ^ model).sum() > 100  # the stroke
    assert (saved[b] ^ saved[a]).sum() > 100  # the polygon
    np.testing.assert_array_equal(saved[c], saved[a])  # undo took the whole polygon away
    np.testing.assert_array_equal(saved[d], saved[b])  # redo brought it back
    np.testing.assert_array_equal(saved[e], model)  # clear: back to the model's mask


def test_unsaved_strokes_and_mask_choice_survive_leaving_the_page(
    new_page, shot, app_server
) -> None:
    """Issue 16.5: strokes not yet saved are the session's unsaved edit, not lost."""
    study = image_id(app_server, "Non-COVID/non_covid_11906.png")
    page = open_correction(new_page, study)
    sign_in(page, "Lea Leaver", "annotator")
    page.get_by_text("Infection mask", exact=True).click()
    expect(page.get_by_text("Editing the infection mask")).to_be_visible()
    wait_idle(page)
    draw_stroke(page, (0.3, 0.3), (0.6, 0.5))
    changed = metric_value(page, "Changed pixels").inner_text()

    go_to(page, "Worklist")
    expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
    go_to(page, "Correction")
    expect(page.get_by_text("Editing the infection mask")).to_be_visible()
    expect(metric_value(page, "Changed pixels")).to_have_text(changed)
    expect(page.get_by_text("Unsaved changes")).to_be_visible()
    shot(page, "back-with-unsaved")
    saved = save_draft(page)
    stored = dict((v.id, m) for v, m in versions(app_server, study, "infection"))[saved]
    assert (stored ^ model_mask(app_server, study, "infection")).sum() > 100


def test_worklist_picker_names_the_study_its_buttons_open(new_page, shot, app_server) -> None:
    """Issue 16.6: open a study, come back, filter it out: the picker shows what Review opens."""
    from services import studies
    from services.storage import open_store

    store = open_store(app_server.database_url)
    target = image_id(app_server, "Non-COVID/non_covid_11905.png")
    other = image_id(app_server, "COVID-19/covid_1582.png")
    with store.scope() as s:
        from database import users

        rad = users.get_or_create_user(s, "Pia Picker", "radiologist").id
    info = studies.study_info(store.scope, other)
    mask = np.zeros((info.height, info.width), bool)
    saved = studies.save_mask(store.scope, other, "lung", mask, rad, "approved", None)
    assert saved.ok

    page = new_page(f"/review?study={target}")
    expect(page.get_by_role("heading", name="Review")).to_be_visible()
    go_to(page, "Worklist")
    expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
    picker = page.get_by_role("combobox", name="Open a study (or click a row)")
    expect(picker).to_have_value(re.compile(rf"^#{target} ·"))
    status = page.locator('[data-testid="stMultiSelect"]').filter(has_text="Status")
    status.click()
    page.get_by_role("option", name="approved", exact=True).click()
    page.keyboard.press("Escape")
    expect(page.get_by_text(re.compile(r"^\d+ of \d+ stud"))).not_to_have_text(
        re.compile(r"^(\d+) of \1 ")
    )
    wait_idle(page)
    shown = re.search(r"#(\d+) ·", picker.input_value()).group(1)
    assert int(shown) != target  # the filter removed it from the picker's options
    page.get_by_role("button", name="Review", exact=True).click()
    expect(page.get_by_role("heading", name="Review")).to_be_visible()
    expect(page.get_by_role("combobox", name="Study")).to_have_value(re.compile(rf"^#{shown} ·"))
    shot(page, "opened-what-was-shown")
