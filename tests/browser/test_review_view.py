"""Issue 16.4 in real Chromium: the Review panels keep the user's zoom and pan when the overlay
opacity or the Grad-CAM class redraw them (the window/level case: the DICOM test in
test_app_browser.py), and a double-click still shows the whole image again."""

from __future__ import annotations

import pytest
from browser_helpers import wait_idle
from correction_helpers import image_id
from playwright.sync_api import Locator, Page, expect

pytestmark = pytest.mark.browser

# The axis ranges plotly is showing (all four panels share them: matched axes).
VIEW = "(el) => [...el._fullLayout.xaxis.range, ...el._fullLayout.yaxis.range]"


def plot(page: Page) -> Locator:
    return page.locator(".st-key-review-panels .js-plotly-plot")


def view(page: Page) -> list[float]:
    return plot(page).evaluate(VIEW)


def wait_view(page: Page, condition: str, arg: object) -> list[float]:
    """Wait until ``condition(view, arg)`` (JS) holds for the shown view; return the view."""
    page.wait_for_function(
        f"([el, arg]) => ({condition})(({VIEW})(el), arg)", arg=[plot(page).element_handle(), arg]
    )
    return view(page)


def wait_drawn(page: Page) -> None:
    """The newest figure is on screen (the chart is aria-busy while it draws)."""
    wait_idle(page)
    expect(plot(page)).not_to_have_attribute("aria-busy", "true")


def heat_map(page: Page) -> Locator:
    return plot(page).locator("g.imagelayer image").nth(3)  # the Grad-CAM overlay


def assert_view_kept(page: Page, expected: list[float], full: list[float]) -> None:
    tolerance = 0.01 * abs(full[1] - full[0])
    shown = view(page)
    assert all(abs(a - b) < tolerance for a, b in zip(shown, expected, strict=True)), (
        f"view {shown} after the redraw; the user's was {expected} (whole image {full})"
    )


def test_zoom_and_pan_survive_opacity_and_gradcam_class_changes(new_page, shot, app_server) -> None:
    study = image_id(app_server, "COVID-19/covid_1579.png")
    page = new_page(f"/review?study={study}")
    expect(page.get_by_role("heading", name="Review")).to_be_visible()
    expect(plot(page).locator("g.imagelayer image")).to_have_count(4)
    wait_drawn(page)
    full = view(page)

    # Zoom in with the mode bar (as the mouse wheel does), then pan by dragging the X-ray panel
    # (the drag mode is pan). Both are the user's own view changes to plotly.
    plot(page).hover()
    plot(page).locator('.modebar-btn[data-title="Zoom in"]').click()
    zoomed = wait_view(
        page, "(v, full) => Math.abs(v[1] - v[0]) < 0.9 * Math.abs(full[1] - full[0])", full
    )
    drag = plot(page).locator(".nsewdrag").first  # the X-ray panel's drag surface
    drag.hover()
    box = drag.bounding_box()
    assert box is not None
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx + 40, cy + 30, steps=8)
    page.mouse.up()
    user_view = wait_view(page, "(v, before) => Math.abs(v[0] - before[0]) > 5", zoomed)
    shot(page, "zoomed-and-panned")

    # Another opacity redraws the overlays (the heat map at least): the view stays.
    before = heat_map(page).get_attribute("href")
    slider = page.get_by_role("slider", name="Overlay opacity")
    slider.focus()
    page.keyboard.press("ArrowRight")
    expect(heat_map(page)).not_to_have_attribute("href", before)
    wait_drawn(page)
    assert_view_kept(page, user_view, full)
    shot(page, "opacity-changed")

    # Another Grad-CAM class redraws the heat map and its title: the view stays.
    select = page.locator('[data-testid="stSelectbox"]').filter(has_text="Grad-CAM explains")
    current = select.get_by_role("combobox").input_value()
    other = next(c for c in ("Normal", "COVID-19", "Non-COVID") if c != current)
    select.click()
    page.get_by_role("option", name=other, exact=True).click()
    expect(plot(page).get_by_text(f"Grad-CAM: {other}")).to_be_visible()
    wait_drawn(page)
    assert_view_kept(page, user_view, full)
    shot(page, "gradcam-class-changed")

    # A double-click shows the whole image again.
    page.mouse.dblclick(cx, cy)
    wait_view(page, "(v, full) => v.every((x, i) => Math.abs(x - full[i]) < 1)", full)
