"""The app in real Chromium: upload, the review panels, bad input, the worklist's picker.
Drawing corrections: test_correction_browser.

Each test works on its own study so the order does not matter; the database is inspected
through the database modules, exactly as the app wrote it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from browser_helpers import go_to, wait_idle
from correction_helpers import image_id
from dicom_samples import pydicom_data_file
from playwright.sync_api import Locator, Page, expect

pytestmark = pytest.mark.browser


# ----------------------------------------------------------------------------- helpers
def upload(page: Page, *files: Path) -> None:
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(
        [str(f) for f in files]
    )


def panels(page: Page) -> Locator:
    return page.locator(".st-key-review-panels")


def expect_four_panels(page: Page) -> None:
    chart = panels(page)
    expect(chart.locator("g.imagelayer image")).to_have_count(4)
    for title in ("X-ray", "Lung mask", "Infection mask", "Grad-CAM"):
        expect(chart.get_by_text(title, exact=False).first).to_be_visible()


def expect_probabilities(page: Page) -> None:
    expect(page.get_by_role("heading", name="Class probabilities")).to_be_visible()
    bars = page.locator(".st-key-review-probabilities")
    for name in ("COVID-19", "Non-COVID", "Normal"):
        expect(bars.get_by_text(name, exact=True).first).to_be_visible()
    expect(page.get_by_text(re.compile(r"Predicted: .+ \(\d+\.\d%\)"))).to_be_visible()


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
    wait_idle(page)
    expect(panels(page).locator(".js-plotly-plot")).to_have_attribute("aria-busy", "false")
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
    zoomed = page.evaluate(f"([el, a]) => ({width})(el, a)", [plot, "xaxis4"])
    # Another window re-renders all panels from the stored raw pixels (no model run), in the
    # same view (issue 16.4).
    first = panels(page).locator("g.imagelayer image").first
    before = first.get_attribute("href")
    select = page.locator('[data-testid="stSelectbox"]').filter(has_text="Window preset")
    select.click()
    page.get_by_role("option", name="Lung", exact=True).click()
    expect(page.get_by_text(re.compile(r"Centre \d+, width \d+ \(raw units\)"))).to_be_visible()
    expect(first).not_to_have_attribute("href", before)
    expect(panels(page).locator("g.imagelayer image")).to_have_count(4)
    wait_idle(page)
    expect(panels(page).locator(".js-plotly-plot")).to_have_attribute("aria-busy", "false")
    kept = panels(page).locator(".js-plotly-plot").evaluate(f"(el) => ({width})(el, 'xaxis4')")
    assert abs(kept - zoomed) < 0.01 * full, (kept, zoomed, full)
    shot(page, "review-dicom-lung-window")
    page.get_by_role("heading", name="Class probabilities").scroll_into_view_if_needed()
    shot(page, "review-dicom-facts")


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
