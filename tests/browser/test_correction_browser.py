"""The correction page in real Chromium: drawing and saving, concurrent saves refused and kept,
undo/redo/clear pixel by pixel, unsaved strokes kept while other pages are open.

Each test works on its own study so the order does not matter; the database is inspected
through the database modules, exactly as the app wrote it.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from browser_helpers import go_to, sign_in, wait_idle
from correction_helpers import (
    app_button,
    canvas_box,
    choose_tool,
    draw_polygon,
    draw_stroke,
    edit_infection,
    expect_drawing_layer_empty,
    image_id,
    metric_value,
    model_mask,
    open_correction,
    save_draft,
    versions,
    wait_result_gray_at,
)
from playwright.sync_api import expect

pytestmark = pytest.mark.browser


def test_draw_on_canvas_and_save_creates_version(new_page, shot, app_server) -> None:
    study = image_id(app_server, "Normal/normal_1.png")
    page = open_correction(new_page, study)
    sign_in(page, "Alice Annotator", "annotator")
    expect(page.locator("canvas.dc-canvas").first).to_be_visible()
    shot(page, "correction")

    draw_stroke(page, (0.2, 0.3), (0.8, 0.7))
    shot(page, "drawn")
    changed = metric_value(page, "Changed pixels").inner_text()
    choose_tool(page, "Polygon: erase")
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


def test_undo_redo_clear_are_what_is_saved_pixel_by_pixel(new_page, shot, app_server) -> None:
    """Issue 16.1: brush, polygon, undo, redo, clear on the infection mask; after each the
    stored mask is exactly the one the page had shown for that state."""
    study = image_id(app_server, "Non-COVID/non_covid_11905.png")
    page = open_correction(new_page, study)
    edit_infection(page, "Una Undo")

    draw_stroke(page, (0.2, 0.3), (0.45, 0.35))
    expect_drawing_layer_empty(page)
    after_stroke = metric_value(page, "Changed pixels").inner_text()
    a = save_draft(page)

    choose_tool(page, "Polygon: add")
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
    edit_infection(page, "Lea Leaver")
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


def test_keyboard_undo_redo_and_save(new_page, shot, app_server) -> None:
    """Issue 14.2 (the keys): Ctrl+Z, Ctrl+Shift+Z and Ctrl+S do what the buttons do."""
    study = image_id(app_server, "Normal/normal_10.png")
    page = open_correction(new_page, study)
    edit_infection(page, "Kim Keys")
    expect(page.get_by_text("Ctrl+S save draft")).to_be_visible()  # listed on the page
    draw_stroke(page, (0.25, 0.4), (0.7, 0.6))
    drawn = metric_value(page, "Changed pixels").inner_text()
    wait_idle(page)
    page.keyboard.press("Control+z")
    expect(metric_value(page, "Changed pixels")).to_have_text("0")
    wait_idle(page)
    page.keyboard.press("Control+Shift+z")
    expect(metric_value(page, "Changed pixels")).to_have_text(drawn)
    wait_idle(page)
    page.keyboard.press("Control+s")
    message = page.get_by_text(re.compile(r"Draft saved: infection mask version \d+"))
    expect(message).to_be_visible()
    shot(page, "saved-by-key")
    saved = int(re.search(r"version (\d+)", message.inner_text()).group(1))
    stored = dict((v.id, m) for v, m in versions(app_server, study, "infection"))[saved]
    assert (stored ^ model_mask(app_server, study, "infection")).sum() > 100  # the stroke


def test_click_tool_changes_the_mask_and_the_version_is_saved(new_page, shot, app_server) -> None:
    """Issue 14.2 (the click tool): a click where the lung mask is missing adds there, a remove
    click takes it away again, and what is saved is the mask the page showed."""
    study = image_id(app_server, "Non-COVID/non_covid_11906.png")  # its lung: no other test's
    page = open_correction(new_page, study)
    sign_in(page, "Cleo Clicker", "annotator")
    expect(page.locator("canvas.dc-canvas").first).to_be_visible()
    choose_tool(page, "Click: add")
    box = canvas_box(page)
    page.mouse.click(box["x"] + 0.06 * box["width"], box["y"] + 0.06 * box["height"])
    expect(metric_value(page, "Changed pixels")).not_to_have_text("0")
    expect_drawing_layer_empty(page)  # the click became part of the mask, not a mark
    shot(page, "clicked")
    added = metric_value(page, "Changed pixels").inner_text()
    saved = save_draft(page)
    stored = dict((v.id, m) for v, m in versions(app_server, study, "lung"))[saved]
    h, w = stored.shape
    assert stored[int(0.06 * h), int(0.06 * w)]
    assert not model_mask(app_server, study, "lung")[int(0.06 * h), int(0.06 * w)]

    choose_tool(page, "Click: remove")
    box = canvas_box(page)  # where the canvas is now, not where it was before the save
    page.mouse.click(box["x"] + 0.06 * box["width"], box["y"] + 0.06 * box["height"])
    expect(metric_value(page, "Changed pixels")).not_to_have_text(added)
    wait_result_gray_at(page, 0.06, 0.06)  # no mask at the clicked place any more


def _canvas_showing(page, view: str) -> None:  # noqa: ANN001
    """Wait for the canvas of ``view`` (its key part, e.g. ``view-4-``) with its X-ray drawn."""
    from correction_helpers import BACKGROUND_DRAWN

    root = page.locator(f'[class*="correction-canvas"][class*="-{view}"]').first
    expect(root.locator("canvas.dc-canvas").first).to_be_visible()
    page.wait_for_function(BACKGROUND_DRAWN, arg=root.locator("canvas.dc-background-canvas")
                           .element_handle())
    wait_idle(page)


def test_tool_keys_zoom_and_pan_edit_at_full_resolution_and_next_study(
    new_page, shot, app_server,  # noqa: ANN001
) -> None:
    """Issue 14.2: K / B pick tools, I zooms, D pans; a stroke on the 4x canvas changes
    only the window shown, at the image's own resolution; N opens the next study."""
    study = image_id(app_server, "Normal/normal_1.png")  # its infection: no other test's
    page = open_correction(new_page, study)
    edit_infection(page, "Zoe Zoomer")
    expect(page.get_by_text("I / O zoom in / out")).to_be_visible()  # the keys, listed

    def primary(label: str):  # noqa: ANN202
        return page.locator(f'.st-key-correction-tool-{label} [data-testid="stBaseButton-primary"]')

    # Letter keys act when no field or choice has the focus (the mask choice just had it).
    page.get_by_role("heading", name="Correction").click()
    page.keyboard.press("k")
    expect(primary("click-add")).to_have_count(1)
    wait_idle(page)
    page.keyboard.press("b")
    expect(primary("brush-add")).to_have_count(1)
    wait_idle(page)
    for zoom in (2, 4):
        page.keyboard.press("i")
        expect(page.get_by_text(f"{zoom}× zoom")).to_be_visible()
        _canvas_showing(page, f"view-{zoom}-")
    page.keyboard.press("d")  # pan right: half a 64-pixel window
    expect(page.get_by_text("4× zoom: columns 128–191, rows 96–159 of 256×256")).to_be_visible()
    _canvas_showing(page, "view-4-0_5000-0_6250")
    shot(page, "zoomed")
    draw_stroke(page, (0.2, 0.5), (0.8, 0.5))  # 24-pixel brush = 3 image pixels at 4x
    saved = save_draft(page)
    stored = dict((v.id, m) for v, m in versions(app_server, study, "infection"))[saved]
    changed = stored ^ model_mask(app_server, study, "infection")
    ys, xs = np.nonzero(changed)
    assert len(ys) > 50
    assert ys.min() >= 96 and ys.max() <= 159 and xs.min() >= 128 and xs.max() <= 191
    assert ys.max() - ys.min() <= 6  # a thin line: drawn at 4x, not at the image's 1/2 size
    assert xs.max() - xs.min() >= 30  # across most of the 64-pixel window

    wait_idle(page)
    page.keyboard.press("n")  # the next study of the worklist: the page's address names it
    expect(page).to_have_url(re.compile(rf"study=(?!{study}$)\d+$"))
    expect(page.get_by_text("Editing the infection mask")).to_be_visible()
    shot(page, "next-study")
