"""Real Chromium against ``streamlit run app.py``.

One app server per test session: a temporary SQLite database, a random small checkpoint via
``INFMAP_CHECKPOINT`` (so nothing depends on training), a free port; the fixture waits for
``/_stcore/health`` and stops the server at the end. Without ``/usr/bin/chromium`` the tests skip,
unless ``INFMAP_REQUIRE_BROWSER=1`` (CI) where that is a failure. Screenshots of each step go to
``test-output/browser/``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser_helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    REPO,
    AppServer,
    start_app,
    stop_app,
    wait_idle,
)

import settings

SHOTS = REPO / "test-output" / "browser"
VIEWPORT = {"width": 1600, "height": 1000}
TIMEOUT_MS = 60_000  # first model load + sample import on a busy 2-core machine


def require_chromium() -> None:
    if CHROMIUM.exists():
        return
    reason = f"{CHROMIUM} is missing (apt-get install chromium)"
    if settings.require_browser():
        pytest.fail(f"INFMAP_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def app_server(
    tmp_path_factory: pytest.TempPathFactory, random_checkpoint: Path
) -> Iterator[AppServer]:
    require_chromium()
    tmp = tmp_path_factory.mktemp("browser-app")
    server = start_app(f"sqlite:///{tmp / 'infmap.sqlite'}", random_checkpoint, tmp / "app.log")
    try:
        yield server
    finally:
        stop_app(server)


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    require_chromium()
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def warm_app(browser, app_server: AppServer) -> AppServer:  # noqa: ANN001
    """Open "/" once first. Streamlit's st.navigation shows a spurious "Page not found" modal
    when the very first session after the server starts deep-links to another page
    (streamlit/streamlit#8860, #9992); this visit also pays the first-start bootstrap."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport=VIEWPORT)
    try:
        page = context.new_page()
        page.goto(app_server.url)
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible(timeout=TIMEOUT_MS * 2)
    finally:
        context.close()
    return app_server


@pytest.fixture
def new_page(browser, warm_app: AppServer):  # noqa: ANN001, ANN201 - playwright types
    """Factory: ``new_page(path)`` opens the app in a fresh browser context (a separate user)."""
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    contexts = []

    def open_page(path: str = "/"):  # noqa: ANN202
        context = browser.new_context(viewport=VIEWPORT)
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        page.goto(warm_app.url + path)
        return page

    yield open_page
    for context in contexts:
        context.close()


@pytest.fixture
def shot(request: pytest.FixtureRequest):  # noqa: ANN201
    """``shot(page, "step")`` saves test-output/browser/<test>-<nn>-<step>.png."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    test = re.sub(r"[^A-Za-z0-9_]+", "_", request.node.name)
    counter = {"n": 0}

    def take(page, step: str) -> Path:  # noqa: ANN001
        wait_idle(page)  # no half-rerun page (stale elements) in the picture
        counter["n"] += 1
        path = SHOTS / f"{test}-{counter['n']:02d}-{step}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return take


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The two-server tests last, after any random order: when they ran first, later correction
    tests often saw the page stop following the server (the server's log shows the run after
    Sign in rendering "Signed in as ...", the audit trail has the sign-in, Chromium keeps the
    form). Not the shared Chromium and not PostgreSQL; not understood yet (see issue 13's note)."""
    items.sort(key=lambda item: "test_two_servers.py" in item.nodeid)  # stable: others keep order
