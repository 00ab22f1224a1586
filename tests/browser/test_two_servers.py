"""Two app servers on one database, a Chromium user on each (issue 13.2): on a SQLite file and
on PostgreSQL. Both servers start at the same moment on an empty database (each registers the
shipped checkpoint and imports the samples on first start), then two annotators save the same
study, one through each server: one save wins, the other is refused and kept as a draft."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser_helpers import AppServer, sign_in, start_app, stop_app, wait_idle
from correction_helpers import draw_stroke, image_id, model_mask, versions
from playwright.sync_api import Page, expect

from database import model_versions, worklist
from database.session import make_engine, session_scope

pytestmark = [pytest.mark.browser, pytest.mark.timeout(1200)]  # two first starts
STUDY = "COVID-19/covid_1582.png"
VIEWPORT = {"width": 1600, "height": 1000}
TIMEOUT_MS = 90_000  # two servers' first start (model load, sample import) on 2 busy cores


def _start_both(url: str, checkpoint: Path, tmp: Path, data_dir: Path | None) -> list[AppServer]:
    started: list[AppServer | BaseException] = [RuntimeError("not started")] * 2

    def start(i: int) -> None:
        try:
            started[i] = start_app(url, checkpoint, tmp / f"app{i}.log", timeout=180,
                                   data_dir=data_dir)
        except BaseException as exc:  # re-raised below, after both have been tried
            started[i] = exc

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    servers = [s for s in started if isinstance(s, AppServer)]
    if len(servers) < 2:
        for server in servers:
            stop_app(server)
        raise next(s for s in started if isinstance(s, BaseException))
    return servers


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def two_servers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
    random_checkpoint: Path, browser,  # noqa: ANN001 - first: Chromium is there (or skip/fail)
) -> Iterator[list[AppServer]]:
    tmp = tmp_path_factory.mktemp(f"two-servers-{request.param}")
    if request.param == "sqlite":
        url, data_dir = f"sqlite:///{tmp / 'infmap.sqlite'}", None
    else:
        server = request.getfixturevalue("postgres_server")
        url, data_dir = server.create_database(f"two_servers_{tmp.name}"), tmp / "store"
    servers = _start_both(url, random_checkpoint, tmp, data_dir)
    try:
        yield servers
    finally:
        for s in servers:
            stop_app(s)


def _page(browser, server: AppServer) -> Page:  # noqa: ANN001
    """A fresh user on ``server``'s worklist. "/" first: a first deep link to another page shows
    a spurious "Page not found" modal (streamlit/streamlit#8860)."""
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto(server.url)  # the script's first run on this server starts now
    return page


def test_saves_through_two_servers_refuse_the_stale_one(
    browser, two_servers: list[AppServer]  # noqa: ANN001
) -> None:
    one, two = two_servers
    expect.set_options(timeout=TIMEOUT_MS)
    ann, bob = _page(browser, one), _page(browser, two)  # both first starts at once
    try:
        for page in (ann, bob):
            expect(page.get_by_role("heading", name="Worklist")).to_be_visible(
                timeout=TIMEOUT_MS * 2)
        engine = make_engine(one.database_url)
        try:
            with session_scope(engine, write=False) as s:  # nothing doubled by the two starts
                assert len(worklist.worklist(s)) == 6
                listed = model_versions.list_model_versions(s)
                assert len(listed) == 1 and listed[0].active
        finally:
            engine.dispose()

        study = image_id(one, STUDY)
        for page, server, name in ((ann, one, "Ann One"), (bob, two, "Bob Two")):
            page.goto(f"{server.url}/correct?study={study}")
            expect(page.get_by_role("heading", name="Correction")).to_be_visible()
            wait_idle(page)  # a click during a script run can be lost on a busy machine
            sign_in(page, name, "annotator")
        draw_stroke(ann, (0.1, 0.2), (0.5, 0.3))
        draw_stroke(bob, (0.5, 0.6), (0.9, 0.8))

        ann.get_by_role("button", name="Save draft").click()
        expect(ann.get_by_text(re.compile(r"Draft saved: lung mask version \d+"))).to_be_visible()
        bob.get_by_role("button", name="Save draft").click()
        refusal = bob.locator('[data-testid="stAlert"]').filter(
            has_text=re.compile(r"Ann One saved a newer lung mask")
        )
        expect(refusal).to_be_visible()
        expect(bob.get_by_text(re.compile(r"saved as your draft version \d+"))).to_be_visible()
    finally:
        ann.context.close()
        bob.context.close()

    saved = versions(one, study, "lung")
    assert [(v.author.name, v.conflict) for v, _ in saved] == [("Ann One", False),
                                                                ("Bob Two", True)]
    (_, ann_mask), (_, bob_mask) = saved
    model = model_mask(one, study, "lung")
    assert (bob_mask ^ model).sum() > 100 and (bob_mask ^ ann_mask).sum() > 100  # nothing lost
