"""Two app servers on one database, a Chromium user on each (issue 13.2): on a SQLite file and
on PostgreSQL. Both servers start at the same moment on an empty database (each registers the
shipped checkpoint and imports the samples on first start), then two annotators save the same
study, one through each server: one save wins, the other is refused and kept as a draft; and a
researcher starts fine-tuning on one server while another watches it on the other."""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser_helpers import AppServer, sign_in, start_app, stop_app, wait_idle
from correction_helpers import draw_stroke, image_id, model_mask, versions
from covid_qu_ex import build_mini_tree
from playwright.sync_api import Page, expect

import settings
from database import model_versions, runs, worklist
from database.session import make_engine, session_scope
from services.import_masks import import_masks

pytestmark = [pytest.mark.browser, pytest.mark.timeout(1200)]  # two first starts
STUDY = "COVID-19/covid_1582.png"
CORRECTED = ("Normal/normal_1", "Non-COVID/non_covid_11906")  # the fine-tuning test's studies
RANDOM_MODEL_VERSION = "random-test"  # what tests/conftest.py's random checkpoint calls itself
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
                listed = model_versions.list_model_versions(s)  # (+ the fine-tuning test's)
                first = [v for v in listed if v.version == RANDOM_MODEL_VERSION]
                assert len(first) == 1 and first[0].active
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


def _import_corrections(database_url: str, dest: Path) -> None:
    """Submitted masks on two studies (not the save test's), through the app's import path."""
    for kind in ("images", "lung", "infection"):
        (dest / kind).mkdir(parents=True)
    for case in CORRECTED:
        stem = Path(case).name
        shutil.copy(settings.SAMPLES_DIR / f"{case}.png", dest / "images" / f"{stem}.png")
        for kind in ("lung", "infection"):
            shutil.copy(settings.SAMPLES_DIR / f"{case}_{kind}.png", dest / kind / f"{stem}.png")
    engine = make_engine(database_url)
    try:
        summary = import_masks(engine, dest / "images", dest / "lung", dest / "infection",
                               "Importer")
        assert summary.images_new == 0 and summary.versions_saved == 4, summary
    finally:
        engine.dispose()


def _runs(engine) -> list[int]:  # noqa: ANN001
    with session_scope(engine, write=False) as s:
        return [r.id for r in runs.list_runs(s)]


def test_a_finetune_started_on_one_server_is_seen_on_the_other(
    browser, two_servers: list[AppServer], tmp_path: Path  # noqa: ANN001
) -> None:
    one, two = two_servers
    expect.set_options(timeout=TIMEOUT_MS)
    data = build_mini_tree(tmp_path / "qu-ex", splits=("Train", "Val"))  # replay and Val
    rita, sam = _page(browser, one), _page(browser, two)
    try:
        for page in (rita, sam):  # the first start creates the schema and imports the samples
            expect(page.get_by_role("heading", name="Worklist")).to_be_visible(
                timeout=TIMEOUT_MS * 2)
        _import_corrections(one.database_url, tmp_path / "corrections")
        for page, server, name in ((rita, one, "Rita One"), (sam, two, "Sam Two")):
            page.goto(f"{server.url}/models")
            expect(page.get_by_role("heading", name="Models")).to_be_visible()
            wait_idle(page)
            sign_in(page, name, "researcher")
        form = rita.locator('[data-testid="stForm"]')
        form.get_by_label("Steps").fill("10")
        form.get_by_label("COVID-QU-Ex folder (replay and Val)").fill(str(data))
        form.get_by_label("COVID-QU-Ex folder (replay and Val)").press("Tab")
        form.get_by_role("button", name="Start fine-tuning").click()
        # Server two knows of it only through the database: its progress, then its outcome.
        engine = make_engine(two.database_url)
        try:
            deadline = time.monotonic() + 60
            while not (listed := _runs(engine)) and time.monotonic() < deadline:
                time.sleep(0.2)  # the click's script run registers the run
            (run_id,) = listed
            running = re.compile(rf"^Run {run_id}: .+ \(\d+%\)$")  # the progress bar's text
            expect(rita.get_by_text(running)).to_be_visible()
            expect(sam.get_by_text(running)).to_be_visible()
            finished = re.compile(rf"Latest: run {run_id} finished at .*, made (\S+)\.")
            expect(sam.get_by_text(finished)).to_be_visible(timeout=TIMEOUT_MS * 4)
            with session_scope(engine, write=False) as s:
                run = runs.get_run(s, run_id)
                assert run.status == "succeeded" and run.host and run.model_version is not None
                made = run.model_version.version
                assert {v.version for v in model_versions.list_model_versions(s)} == \
                    {RANDOM_MODEL_VERSION, made}
        finally:
            engine.dispose()
        expect(sam.get_by_text(finished)).to_contain_text(made)
        expect(rita.get_by_text(finished)).to_contain_text(made)  # and on the first server
    finally:
        rita.context.close()
        sam.context.close()
        _reactivate(one.database_url, RANDOM_MODEL_VERSION)  # the save test's model, whatever
        # the gate decided: the module's tests run in any order on the same two servers


def _reactivate(database_url: str, version: str) -> None:
    engine = make_engine(database_url)
    try:
        with session_scope(engine) as s:
            (row,) = [v for v in model_versions.list_model_versions(s) if v.version == version]
            model_versions.set_active_model_version(s, row.id)
    finally:
        engine.dispose()
