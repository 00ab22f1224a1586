"""Real Chromium against ``streamlit run app.py``.

One app server per test session: a temporary SQLite database, a random small checkpoint via
``INFMAP_CHECKPOINT`` (so nothing depends on training), a free port; the fixture waits for
``/_stcore/health`` and stops the server at the end. Without ``/usr/bin/chromium`` the tests skip,
unless ``INFMAP_REQUIRE_BROWSER=1`` (CI) where that is a failure. Screenshots of each step go to
``test-output/browser/``.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "test-output" / "browser"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1600, "height": 1000}
TIMEOUT_MS = 60_000  # first model load + sample import on a busy 2-core machine


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.browser)


def require_chromium() -> None:
    if CHROMIUM.exists():
        return
    reason = f"{CHROMIUM} is missing (apt-get install chromium)"
    if os.environ.get("INFMAP_REQUIRE_BROWSER") == "1":
        pytest.fail(f"INFMAP_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class AppServer:
    url: str
    database_url: str
    log_path: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def start_app(
    database_url: str, checkpoint: Path, log_path: Path, timeout: float = 90.0
) -> AppServer:
    """``streamlit run app.py`` on a free port; returns once the health endpoint answers."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "INFMAP_CHECKPOINT": str(checkpoint),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # a model trains on this machine: stay modest
        "PYTHONPATH": str(REPO),
    }
    env.pop("INFMAP_DATA_DIR", None)  # the file store sits next to the temp SQLite file
    cmd = [
        sys.executable, "-m", "streamlit", "run", "app.py",
        "--server.port", str(port), "--server.address", "127.0.0.1",
        "--server.headless", "true",
    ]  # fmt: skip
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = AppServer(f"http://127.0.0.1:{port}", database_url, log_path, process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited with {process.returncode}:\n{server.log()}")
        try:
            with urllib.request.urlopen(f"{server.url}/_stcore/health", timeout=2) as resp:
                if resp.status == 200:
                    return server
        except OSError:
            time.sleep(0.2)
    stop_app(server)
    raise RuntimeError(f"streamlit did not become healthy in {timeout}s:\n{server.log()}")


def stop_app(server: AppServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


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


@pytest.fixture
def new_page(browser, app_server: AppServer):  # noqa: ANN001, ANN201 - playwright types
    """Factory: ``new_page()`` opens the app in a fresh browser context (a separate user)."""
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    contexts = []

    def open_page():  # noqa: ANN202
        context = browser.new_context(viewport=VIEWPORT)
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        page.goto(app_server.url)
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
        counter["n"] += 1
        path = SHOTS / f"{test}-{counter['n']:02d}-{step}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return take


# ------------------------------------------------------------------------- page helpers
def wait_idle(page) -> None:  # noqa: ANN001
    """Wait until Streamlit has finished the current script run (no running indicator)."""
    from playwright.sync_api import expect

    expect(page.locator('[data-testid="stStatusWidget"]')).to_have_count(0)


def sign_in(page, name: str, role: str = "annotator") -> None:  # noqa: ANN001
    from playwright.sync_api import expect

    sidebar = page.locator('[data-testid="stSidebar"]')
    sidebar.get_by_label("Your name").fill(name)
    sidebar.get_by_label("Your name").press("Enter")
    select = sidebar.locator('[data-testid="stSelectbox"]').filter(has_text="Role")
    select.click()
    page.get_by_role("option", name=role, exact=True).click()
    sidebar.get_by_role("button", name="Sign in").click()
    expect(sidebar.get_by_text(f"Signed in as {name}")).to_be_visible()


def go_to(page, title: str) -> None:  # noqa: ANN001
    page.locator('[data-testid="stSidebarNav"]').get_by_role("link", name=title).click()
