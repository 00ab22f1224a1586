"""The reading on the Review page in real Chromium (issue 11.1): an annotator submits one, a
radiologist whose form started earlier is refused and keeps theirs as a conflict draft, then
approves from the latest reading."""

from __future__ import annotations

import re

import pytest
from browser_helpers import AppServer, sign_in, wait_idle
from playwright.sync_api import Page, expect

from database import reading_versions, worklist
from database.session import make_engine, session_scope

pytestmark = pytest.mark.browser
STUDY = "COVID-19/covid_1579.png"  # no other browser test touches it


def _readings(server: AppServer, name: str) -> tuple[int, list[tuple[str, str, str, bool]]]:
    engine = make_engine(server.database_url)
    try:
        with session_scope(engine, write=False) as s:
            image = next(r.image_id for r in worklist.worklist(s) if r.display_name == name)
            return image, [(v.author.name, v.label, v.status, v.conflict)
                           for v in reading_versions.list_readings(s, image)]
    finally:
        engine.dispose()


def _open_review(new_page, study: int) -> Page:  # noqa: ANN001
    page = new_page(f"/review?study={study}")
    expect(page.get_by_role("heading", name="Review")).to_be_visible()
    expect(page.get_by_role("heading", name="Reading")).to_be_visible()
    return page


def _choose(page: Page, label: str) -> None:
    wait_idle(page)
    group = page.locator('[data-testid="stRadio"]').filter(has_text="Not assessable")
    group.get_by_text(label, exact=True).click()
    expect(group.get_by_role("radio", name=label)).to_be_checked()
    wait_idle(page)


def test_stale_reading_is_refused_kept_and_then_approved(new_page, shot, app_server) -> None:
    study, before = _readings(app_server, STUDY)
    assert before == []
    ann, rad = _open_review(new_page, study), _open_review(new_page, study)
    sign_in(ann, "Ann Reading", "annotator")
    sign_in(rad, "Rad Reading", "radiologist")
    expect(rad.get_by_text("No reading recorded for this study yet.")).to_be_visible()

    _choose(ann, "Normal")
    ann.get_by_role("button", name="Submit reading").click()
    submitted = re.compile(r"Reading submitted for review: version \d+")
    expect(ann.get_by_text(submitted)).to_be_visible()
    shot(ann, "ann-submitted")

    _choose(rad, "COVID-19")  # rad's form started before Ann's reading existed
    rad.get_by_role("button", name="Approve reading").click()
    refusal = rad.locator('[data-testid="stAlert"]').filter(
        has_text=re.compile(r"Ann Reading saved a newer reading \(submitted, version \d+\)")
    )
    expect(refusal).to_be_visible()
    expect(rad.get_by_text(re.compile(r"kept as your draft version \d+"))).to_be_visible()
    shot(rad, "rad-refused")
    _, saved = _readings(app_server, STUDY)
    assert saved == [("Ann Reading", "Normal", "submitted", False),
                     ("Rad Reading", "COVID-19", "draft", True)]

    rad.get_by_role("button", name="Start from the latest reading").click()
    group = rad.locator('[data-testid="stRadio"]').filter(has_text="Not assessable")
    expect(group.get_by_role("radio", name="Normal")).to_be_checked()
    wait_idle(rad)
    rad.get_by_role("button", name="Approve reading").click()
    expect(rad.get_by_text(re.compile(r"Reading approved: version \d+"))).to_be_visible()
    expect(rad.get_by_text(re.compile(r"Latest: Normal · approved · version \d+ by Rad Reading")))\
        .to_be_visible()
    shot(rad, "rad-approved")
    _, saved = _readings(app_server, STUDY)
    assert saved[-1] == ("Rad Reading", "Normal", "approved", False)
