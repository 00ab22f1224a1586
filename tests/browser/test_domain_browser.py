"""Issue 11.3 in real Chromium, on the shipped model (it carries the out-of-domain reference):
a photograph uploaded as PNG is flagged out of domain, Review warns and makes no class call,
the masks stay open for correction; the worklist filters by the flag.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest
from browser_helpers import CHROMIUM, AppServer, start_app, stop_app, wait_idle
from playwright.sync_api import Page, expect

import settings
from database import worklist
from database.session import make_engine, session_scope

pytestmark = pytest.mark.browser
VIEWPORT = {"width": 1600, "height": 1000}
TIMEOUT_MS = 120_000  # the shipped model predicts the six samples at first start


def out_of_domain_count(server: AppServer) -> tuple[int, int]:
    engine = make_engine(server.database_url)
    try:
        with session_scope(engine, write=False) as s:
            rows = worklist.worklist(s)
    finally:
        engine.dispose()
    return sum(r.in_domain is False for r in rows), len(rows)


@pytest.fixture(scope="module")
def shipped_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    if not CHROMIUM.exists():
        if settings.require_browser():
            pytest.fail(f"INFMAP_REQUIRE_BROWSER=1 but {CHROMIUM} is missing")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    tmp = tmp_path_factory.mktemp("browser-domain")
    server = start_app(
        f"sqlite:///{tmp / 'infmap.sqlite'}", settings.SHIPPED_CHECKPOINT, tmp / "app.log"
    )
    try:
        yield server
    finally:
        stop_app(server)


@pytest.fixture
def page(browser, shipped_server: AppServer) -> Iterator[Page]:  # noqa: ANN001
    expect.set_options(timeout=TIMEOUT_MS)
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(TIMEOUT_MS)
    try:
        page = context.new_page()
        page.goto(shipped_server.url)
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
        yield page
    finally:
        context.close()


def photograph(tmp_path: Path) -> Path:
    """scikit-image's "camera" photograph saved as a PNG file."""
    import skimage.data

    image = cv2.imread(str(Path(skimage.data.data_dir) / "camera.png"), cv2.IMREAD_GRAYSCALE)
    path = tmp_path / "street_photo.png"
    cv2.imwrite(str(path), image)
    return path


def stored_in_domain(server: AppServer, file_name: str) -> bool | None:
    """The stored domain decision of the study uploaded as ``file_name`` (stored under a neutral
    label and the salted hash of the name, never the name: ``inference.deid``)."""
    from sqlalchemy import select

    from database.models import Image
    from inference.deid import name_hash

    engine = make_engine(server.database_url)
    try:
        with session_scope(engine, write=False) as s:
            (image_id,) = [i.id for i in s.scalars(select(Image))
                           if i.meta.get("name_hash") == name_hash(file_name)]
            row = next(r for r in worklist.worklist(s) if r.image_id == image_id)
            return row.in_domain
    finally:
        engine.dispose()


def rg1() -> Path:
    from dicom_samples import pydicom_data_file

    return pydicom_data_file("RG1_UNCR.dcm")


@pytest.mark.parametrize("which", ["photograph", "rg1"])
def test_out_of_domain_upload_is_warned_with_no_class_call(
    page: Page, tmp_path: Path, shot, shipped_server: AppServer, which: str  # noqa: ANN001
) -> None:
    """The photograph must be out of domain; RG1 (a real chest CR from before 2019) is warned
    exactly when the shipped model calls it out of domain (2.0.1 does)."""
    path = photograph(tmp_path) if which == "photograph" else rg1()
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files([str(path)])
    name = re.escape(path.name)
    expect(page.get_by_text(re.compile(rf"{name} (added as|is already) study #\d+"))
           ).to_be_visible()
    out = stored_in_domain(shipped_server, path.name) is False
    assert out or which == "rg1", "the photograph must be out of domain"
    page.get_by_test_id("stExpander").get_by_role("button", name="Review").click()
    expect(page.get_by_role("heading", name="Review")).to_be_visible()
    panels = page.locator(".st-key-review-panels")
    expect(panels.locator("g.imagelayer image")).to_have_count(4)  # masks shown either way
    alert = page.locator('[data-testid="stAlert"]').filter(has_text="Out of domain")
    if not out:
        expect(page.get_by_text(re.compile(r"Predicted: .+ \(\d+\.\d%\)"))).to_be_visible()
        expect(alert).to_have_count(0)
        return
    expect(alert).to_be_visible()
    expect(alert).to_contain_text("do not trust the model's class or severity")
    expect(alert).to_contain_text("unlike the chest X-rays the model was trained on")
    expect(alert).to_contain_text(re.compile(r"Out-of-domain score \d+\.\d\d"))
    expect(page.get_by_text("Class: not called (out of domain)")).to_be_visible()
    expect(page.get_by_text(re.compile(r"Predicted: "))).to_have_count(0)
    expect(page.locator('[data-testid="stMetric"]').filter(has_text="Severity")).to_have_count(0)
    shot(page, f"review-out-of-domain-{which}")

    page.get_by_role("button", name="Correct masks").click()  # and open for correction
    expect(page.get_by_role("heading", name="Correction")).to_be_visible()


def test_worklist_filters_to_out_of_domain_studies(
    page: Page, tmp_path: Path, shot, shipped_server: AppServer  # noqa: ANN001
) -> None:
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(
        [str(photograph(tmp_path))]
    )  # the same content as the other test: stored once, whichever runs first
    expect(page.get_by_text(re.compile(r"street_photo\.png (added as|is already) study"))
           ).to_be_visible()
    select = page.locator('[data-testid="stMultiSelect"]').filter(has_text="In domain")
    select.click()
    page.get_by_role("option", name="Out of domain", exact=True).click()
    page.keyboard.press("Escape")
    wait_idle(page)
    flagged, total = out_of_domain_count(shipped_server)
    assert flagged >= 1
    expect(page.get_by_text(f"{flagged} of {total} studies", exact=True)).to_be_visible()
    shot(page, "worklist-out-of-domain")
