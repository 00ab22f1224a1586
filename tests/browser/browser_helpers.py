"""Starting the app for browser tests and benchmarks, and small Streamlit page helpers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
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
    database_url: str, checkpoint: Path, log_path: Path, timeout: float = 90.0,
    data_dir: Path | None = None,
) -> AppServer:
    """``streamlit run app.py`` on a free port; returns once the health endpoint answers.
    ``data_dir``: the file store (``INFMAP_DATA_DIR``; default: next to the SQLite file)."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "INFMAP_CHECKPOINT": str(checkpoint),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # a model trains on this machine: stay modest
        "PYTHONPATH": str(REPO),
    }
    env.pop("INFMAP_DATA_DIR", None)  # by default the store sits next to the temp SQLite file
    # ONNX files the server's fine-tuning runs build go with the test, not into the repo's cache.
    env["INFMAP_ONNX_CACHE"] = str(Path(log_path).parent / "onnx-cache")
    if data_dir is not None:
        env["INFMAP_DATA_DIR"] = str(data_dir)
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
                    _SERVERS.append(server)
                    return server
        except OSError:
            time.sleep(0.2)
    stop_app(server)
    raise RuntimeError(f"streamlit did not become healthy in {timeout}s:\n{server.log()}")


def stop_app(server: AppServer) -> None:
    if server in _SERVERS:
        _SERVERS.remove(server)
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


# ------------------------------------------------------------------------- page helpers
def wait_idle(page) -> None:  # noqa: ANN001
    """Wait until Streamlit has finished the current script run (no running indicator)."""
    from playwright.sync_api import expect

    expect(page.locator('[data-testid="stApp"]')).to_have_attribute(
        "data-test-script-state", "notRunning"
    )


_SERVERS: list[AppServer] = []  # the servers started, newest last (their accounts' database)
TEST_PASSWORD = "browser-password-1234"


@contextmanager
def database_session(database_url: str, write: bool = True) -> Iterator[Any]:
    """A session in one transaction on an app server's database, its engine disposed after."""
    from database.session import make_engine, session_scope

    engine = make_engine(database_url)
    try:
        with session_scope(engine, write=write) as s:
            yield s
    finally:
        engine.dispose()


def ensure_account(database_url: str, name: str, role: str, password: str = TEST_PASSWORD) -> None:
    """The account ``name`` with ``role`` in the app's database (as an admin would make it)."""
    from database import users

    with database_session(database_url) as s:
        if users.get_user(s, name) is None:
            users.create_user(s, name, role, password, by=None)


def fill_sign_in(page, name: str, password: str) -> None:  # noqa: ANN001
    """Fill and submit the sign-in form once the page has finished its run (a submit sent
    while the script still runs can be lost when that run replaces the form)."""
    sidebar = page.locator('[data-testid="stSidebar"]')
    wait_idle(page)
    sidebar.get_by_label("Your name").fill(name)  # no Enter: that would submit the form
    sidebar.get_by_label("Password", exact=True).fill(password)
    wait_idle(page)
    sidebar.get_by_role("button", name="Sign in").click()


def sign_ins_recorded(database_url: str, name: str) -> int:
    """How many sign-ins of ``name`` the audit trail holds."""
    from database import audit

    with database_session(database_url, write=False) as s:
        return len(audit.list_events(s, audit.EventFilter(user_name=name, actions=("sign-in",))))


def sign_in(page, name: str, role: str = "annotator", attempts: int = 3) -> None:  # noqa: ANN001
    """Create the account (in the database of the server the page is on) and sign in.

    A click that is not taken (the form stays, the audit trail has no new sign-in) is clicked
    again, as a user would. A sign-in in the audit trail while the page shows the form is the
    defect fixed by ``pages.common.kept`` and ``runner.fastReruns = false``: a failure."""
    from playwright.sync_api import expect

    server = next((s for s in reversed(_SERVERS) if page.url.startswith(s.url + "/")
                   or page.url == s.url), _SERVERS[-1])
    ensure_account(server.database_url, name, role)
    sidebar = page.locator('[data-testid="stSidebar"]')
    signed_in = sidebar.get_by_text(f"Signed in as {name}")
    for attempt in range(1, attempts + 1):
        before = sign_ins_recorded(server.database_url, name)
        fill_sign_in(page, name, TEST_PASSWORD)
        try:
            expect(signed_in).to_be_visible(timeout=20_000)
            _check_page_follows(page)
            return
        except AssertionError as exc:
            wait_idle(page)
            if signed_in.is_visible():
                return
            state = page.locator('[data-testid="stApp"]').get_attribute("data-test-script-state")
            if sign_ins_recorded(server.database_url, name) != before:
                raise AssertionError(f"{name} is signed in by the audit trail, but the page "
                                     f"shows {sidebar.inner_text()!r}") from exc
            if attempt == attempts:
                raise AssertionError(f"Sign in not taken {attempts} times: script {state!r}, "
                                     f"sidebar {sidebar.inner_text()!r}") from exc


def _check_page_follows(page) -> None:  # noqa: ANN001
    """Open defect (seen once in CI, not reproduced in 15 loaded tries): the sidebar showed the
    sign-in while the Correction page below kept its signed-out render (canvas disabled) after
    the run ended. Said as a warning; the page is then opened again (what a user would do: the
    session keeps the sign-in) and must then follow."""
    from playwright.sync_api import expect

    wait_idle(page)
    stale = page.get_by_text("Sign in first (sidebar")
    if not stale.count():
        return
    warnings.warn("open defect: the sidebar shows the sign-in, the Correction page kept its "
                  "signed-out render; opened the page again", stacklevel=3)
    go_to(page, "Correction")
    expect(stale).to_have_count(0)


def go_to(page, title: str) -> None:  # noqa: ANN001
    page.locator('[data-testid="stSidebarNav"]').get_by_role("link", name=title).click()
