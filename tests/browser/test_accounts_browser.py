"""Log-in, roles and the audit trail in real Chromium (issue 15): a wrong password is refused;
an annotator has no Approve button and a forged approval is refused by the service; an admin
creates an account that then signs in; the admin's audit CSV lists what the test did."""

from __future__ import annotations

import csv
import io
import re

import cv2
import numpy as np
import pytest
from browser_helpers import (
    TEST_PASSWORD,
    AppServer,
    ensure_account,
    fill_sign_in,
    go_to,
    sign_in,
    sign_ins_recorded,
    wait_idle,
)
from correction_helpers import image_id, open_correction
from playwright.sync_api import Page, expect

import settings
from database import images, users
from services import ingest, studies
from services.storage import open_store

pytestmark = pytest.mark.browser
PASSWORD = "a-new-users-password"


def _sidebar(page: Page):  # noqa: ANN202
    return page.locator('[data-testid="stSidebar"]')


def test_wrong_password_is_refused_and_no_developer_menu(new_page, shot, app_server) -> None:
    ensure_account(app_server.database_url, "Wanda Wrong", "annotator")
    page = new_page("/")
    expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
    fill_sign_in(page, "Wanda Wrong", "not-her-password")
    expect(_sidebar(page).get_by_text("Wrong name or password.")).to_be_visible()
    expect(_sidebar(page).get_by_text("Signed in as")).to_have_count(0)
    shot(page, "wrong-password")
    wait_idle(page)
    # Served as a product: no Deploy button (client.toolbarMode = "viewer"), even on localhost.
    expect(page.get_by_role("button", name="Deploy")).to_have_count(0)


def _own_study(server: AppServer) -> tuple[int, int, int]:
    """A study no other browser test touches (a flipped sample), with a lung mask submitted by
    an annotator: (study id, submitted version id, the annotator's user id)."""
    pixels = cv2.imread(str(settings.SAMPLES_DIR / "Normal" / "normal_1.png"))
    ok, png = cv2.imencode(".png", np.ascontiguousarray(pixels[:, ::-1]))
    assert ok
    store = open_store(server.database_url)
    try:
        outcome = ingest.ingest_file(store.scope, png.tobytes(), "flipped.png", [])
        assert outcome.ok, outcome.error
        ensure_account(server.database_url, "Andy Annotator", "annotator")
        with store.scope(write=False) as s:
            andy = int(users.get_user(s, "Andy Annotator").id)
        with store.scope(write=False) as s:
            image = images.get_image(s, outcome.image_id)
            mask = np.zeros((image.height, image.width), bool)
        mask[10:-10, 10:-10] = True
        saved = studies.save_mask(store.scope, outcome.image_id, "lung", mask, andy,
                                  "submitted", None)
        assert saved.ok, saved.message
        return outcome.image_id, int(saved.version_id), andy
    finally:
        store.engine.dispose()


def test_annotator_has_no_approve_and_a_forged_approval_is_refused(
    new_page, shot, app_server
) -> None:
    study, version, andy = _own_study(app_server)
    page = new_page(f"/correct?study={study}")
    expect(page.get_by_role("heading", name="Correction")).to_be_visible()
    sign_in(page, "Andy Annotator", "annotator")
    expect(page.get_by_role("button", name="Submit for review")).to_be_visible()
    expect(page.get_by_text("Approve and Send back are for radiologists.")).to_be_visible()
    expect(page.get_by_role("button", name="Approve", exact=True)).to_have_count(0)
    expect(page.get_by_role("button", name="Send back", exact=True)).to_have_count(0)
    shot(page, "annotator-no-approve")

    store = open_store(app_server.database_url)  # the same call the button would make, forged
    try:
        forged = studies.review_head(store.scope, study, "lung", andy, "approve", version)
        assert not forged.ok and "radiologist" in forged.message
        assert studies.head_version(store.scope, study, "lung").status == "submitted"
    finally:
        store.engine.dispose()


def _download_audit(page: Page) -> list[dict[str, str]]:
    with page.expect_download() as info:
        page.get_by_test_id("stDownloadButton").get_by_role("button").click()
    text = info.value.path().read_text()
    return list(csv.DictReader(io.StringIO(text)))


def test_admin_creates_a_user_who_signs_in_and_the_audit_lists_it(
    new_page, shot, app_server
) -> None:
    ensure_account(app_server.database_url, "Ada Admin", "admin")
    admin = new_page("/admin")
    expect(admin.get_by_role("heading", name="Admin")).to_be_visible()
    expect(admin.get_by_text("Admins only")).to_be_visible()
    sign_in(admin, "Ada Admin", "admin")
    expect(admin.get_by_role("heading", name="User accounts")).to_be_visible()
    form = admin.locator('[data-testid="stForm"]').filter(has_text="Create an account")
    form.get_by_label("Name").fill("Nick Newcomer")
    form.get_by_label("Initial password").fill(PASSWORD)
    form.get_by_role("button", name="Create account").click()
    expect(admin.get_by_text("Created annotator Nick Newcomer.")).to_be_visible()
    shot(admin, "created")

    nick = new_page("/")
    expect(nick.get_by_role("heading", name="Worklist")).to_be_visible()
    fill_sign_in(nick, "Nick Newcomer", "a-guess-at-it")
    expect(_sidebar(nick).get_by_text("Wrong name or password.")).to_be_visible()
    wait_idle(nick)
    fill_sign_in(nick, "Nick Newcomer", PASSWORD)
    expect(_sidebar(nick).get_by_text("Signed in as Nick Newcomer (annotator)")).to_be_visible()
    go_to(nick, "Review")
    expect(nick.get_by_role("heading", name="Review")).to_be_visible()
    wait_idle(nick)
    shot(nick, "nick-signed-in")

    go_to(admin, "Worklist")  # away and back: a fresh run of the Admin page after Nick's actions
    expect(admin.get_by_role("heading", name="Worklist")).to_be_visible()
    go_to(admin, "Admin")
    expect(admin.get_by_role("heading", name="Audit trail")).to_be_visible()
    wait_idle(admin)
    rows = _download_audit(admin)
    mine = [(r["user"], r["action"], r["detail"]) for r in reversed(rows)
            if r["user"] in ("Ada Admin", "Nick Newcomer")]
    assert ("Ada Admin", "sign-in", "") in mine
    assert ("Ada Admin", "user create", "Nick Newcomer (annotator)") in mine
    nick_actions = [a for u, a, _ in mine if u == "Nick Newcomer"]
    assert nick_actions[:3] == ["sign-in refused", "sign-in", "view"], nick_actions
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", rows[0]["time (UTC)"])
    shot(admin, "audit")


# Sign in, and 30 ms later (while the password is being checked) pick the infection mask: two
# rerun requests back to back, as when the correction canvas reports its size just after a
# click. Before pages.common.kept and runner.fastReruns = false, the second request stopped the
# sign-in between the audit record and the session (6 of 6 tries here): the audit trail said
# "sign-in", the page showed the form.
SIGN_IN_THEN_PICK_INFECTION = """() => {
    const side = document.querySelector('[data-testid="stSidebar"]');
    const submit = [...side.querySelectorAll('button')].find((b) => b.innerText === 'Sign in');
    const radio = [...document.querySelectorAll('label')]
        .find((l) => l.innerText.trim() === 'Infection mask');
    submit.click();
    setTimeout(() => radio.click(), 30);
}"""


def test_sign_in_holds_when_another_click_follows_at_once(new_page, app_server) -> None:
    study = image_id(app_server, "Normal/normal_1.png")
    for n in range(2):
        name = f"Quick Clicker {n}"
        ensure_account(app_server.database_url, name, "annotator")
        page = open_correction(new_page, study)
        expect(page.locator("canvas.dc-canvas").first).to_be_visible()
        wait_idle(page)
        _sidebar(page).get_by_label("Your name").fill(name)
        _sidebar(page).get_by_label("Password", exact=True).fill(TEST_PASSWORD)
        wait_idle(page)
        page.evaluate(SIGN_IN_THEN_PICK_INFECTION)
        expect(_sidebar(page).get_by_text(f"Signed in as {name}")).to_be_visible()
        expect(page.get_by_text("Editing the infection mask")).to_be_visible()  # both clicks
        assert sign_ins_recorded(app_server.database_url, name) == 1
