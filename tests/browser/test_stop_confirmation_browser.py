"""The Models page asks before it stops a fine-tuning run (issue 16.9): "Stop" only asks, "Keep"
leaves the run alone, "Stop now" ends it (SIGTERM, which a real run catches to register nothing).

The run is a stand-in process recorded as a running fine-tuning run, so the test does not have
to train anything."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest
from browser_helpers import AppServer, go_to, sign_in
from playwright.sync_api import Page, expect

from database import runs
from database.session import make_engine, session_scope

pytestmark = pytest.mark.browser
STOP = re.compile(r"^\W*(stop)?\s*Stop$")  # the button's icon may add its own name


def _record_run(server: AppServer, pid: int) -> int:
    engine = make_engine(server.database_url)
    try:
        with session_scope(engine) as s:
            run = runs.create_run(s, {"note": "browser test stand-in"})
            runs.update_run_progress(s, run.id, 0.25, "epoch 1 of 4", pid=pid)
            return int(run.id)
    finally:
        engine.dispose()


def _finish(server: AppServer, run_id: int) -> None:
    engine = make_engine(server.database_url)
    try:
        with session_scope(engine) as s:
            run = runs.get_run(s, run_id)
            if run is not None and run.status not in runs.FINISHED_RUN_STATUSES:
                runs.finish_run(s, run_id, "interrupted", message="browser test")
    finally:
        engine.dispose()


def test_stop_asks_first_keep_leaves_the_run_and_stop_now_ends_it(
    new_page, shot, app_server: AppServer
) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    run_id = _record_run(app_server, proc.pid)
    try:
        page: Page = new_page("/")
        sign_in(page, "Rhea Researcher", "researcher")
        go_to(page, "Models")
        main = page.get_by_test_id("stMainBlockContainer")  # not the header's own "Stop"
        expect(page.get_by_text(f"Run {run_id}: epoch 1 of 4")).to_be_visible()
        main.get_by_role("button", name=STOP).click()
        stop_now = main.get_by_role("button", name="Stop now")
        expect(stop_now).to_be_visible()
        shot(page, "stop-asks")
        assert proc.poll() is None  # asking is not stopping

        main.get_by_role("button", name="Keep").click()
        expect(stop_now).to_have_count(0)
        expect(main.get_by_role("button", name=STOP)).to_be_visible()
        assert proc.poll() is None

        main.get_by_role("button", name=STOP).click()
        stop_now.click()
        assert proc.wait(timeout=60) == -signal.SIGTERM
        shot(page, "stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _finish(app_server, run_id)
