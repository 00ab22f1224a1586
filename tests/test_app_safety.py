"""Issue 17 in the app: user text shown literally, storage failures in plain words on every page,
unfinished payload files cleaned on start (AppTest on its own temp database)."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import probe_inputs as probe
import pytest
import streamlit as st
from accounts import ensure_account, sign_in_apptest
from app_helpers import APP, IDENTITY_STATE, TIMEOUT
from streamlit.testing.v1 import AppTest

from database import annotation_versions, users
from services import ingest
from services.storage import MISSING_PAYLOAD, open_store
from services.text import md_escape


@pytest.fixture
def app_db(
    tmp_path: Path, random_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """A fresh database with one sample study (the bootstrap predicts it)."""
    samples = tmp_path / "samples" / "Normal"
    samples.mkdir(parents=True)
    shutil.copy(probe.SAMPLES / "Normal" / "normal_1.png", samples)
    db = tmp_path / "infmap.sqlite"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{db}")
    monkeypatch.setenv("INFMAP_CHECKPOINT", str(random_checkpoint))
    monkeypatch.setenv("INFMAP_SAMPLES_DIR", str(tmp_path / "samples"))
    monkeypatch.delenv("INFMAP_DATA_DIR", raising=False)
    yield db


def run(page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    if page is not None:
        at.switch_page(page).run()
    return at


def sign_in(at: AppTest, name: str, create: bool = True) -> None:
    sign_in_apptest(at, name, create=create)


def test_md_escape_leaves_no_markdown() -> None:
    for text in probe.MARKDOWN_INJECTIONS:
        escaped = md_escape(text)
        # No Markdown punctuation is left unescaped (links, images, emphasis, icons, LaTeX, HTML).
        assert re.search(r"(?<!\\)[!\[\]()*_`:<>$/]", escaped) is None, escaped
        assert escaped.replace("\\", "") == text  # and it renders as exactly the text given
    assert md_escape("two\nlines") == "two lines"


def test_signed_in_name_is_shown_literally(app_db: Path) -> None:
    injection = probe.MARKDOWN_INJECTIONS[0]  # ![x](http://example.invalid/track.png)
    at = run()
    sign_in(at, injection)
    assert not at.exception, at.exception
    # AppTest drops the sidebar on the run a form submits; the next page load shows it.
    again = AppTest.from_file(APP, default_timeout=TIMEOUT)
    again.session_state[IDENTITY_STATE] = at.session_state[IDENTITY_STATE]
    again.run()
    (banner,) = [s.value for s in again.sidebar.success]
    assert banner == f"Signed in as {md_escape(injection)} (annotator)"


def test_read_only_database_gives_a_plain_message_at_sign_in(
    app_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run()  # creates and fills the database
    ensure_account(f"sqlite:///{app_db}", "Nobody Yet")
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///file:{app_db}?mode=ro&uri=true")
    at = run()
    sign_in(at, "Nobody Yet", create=False)  # the sign-in is written to the audit trail
    assert not at.exception, at.exception
    message = at.session_state["identity.error"]  # what the sidebar shows under the form
    assert "read-only" in message and "Traceback" not in message and "INSERT" not in message


def test_read_only_database_upload_says_so(app_db: Path) -> None:
    run()
    store = open_store(f"sqlite:///file:{app_db}?mode=ro&uri=true")
    good = (probe.SAMPLES / "COVID-19" / "covid_1579.png").read_bytes()
    outcome = ingest.ingest_file(store.scope, good, "new.png", [])
    store.engine.dispose()
    assert outcome.error is not None and "read-only" in outcome.error


def test_missing_payload_gives_a_plain_message_on_review_and_correction(app_db: Path) -> None:
    # Streamlit's caches live as long as the process: another test may have cached this sample.
    st.cache_resource.clear()
    st.cache_data.clear()
    run()
    for payload in (app_db.parent / "images").glob("*.npz"):
        payload.unlink()
    for page in ("pages/review.py", "pages/correction.py"):
        at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
        at.switch_page(page).run()
        assert not at.exception, (page, at.exception)
        messages = " ".join(e.value for e in at.error)
        assert "missing" in messages, (page, messages)
        assert "PayloadError" not in messages and "Traceback" not in messages
    assert "Upload the original file again" in MISSING_PAYLOAD


def test_unfinished_payload_files_are_removed_on_start(app_db: Path) -> None:
    images = app_db.parent / "images"
    images.mkdir(parents=True)
    stale = images / ("a" * 64 + ".npz.x1y2.tmp")
    fresh = images / ("b" * 64 + ".npz.z3w4.tmp")
    stale.write_bytes(b"\0" * 1024)
    fresh.write_bytes(b"\0" * 1024)
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    run()
    assert not stale.exists()  # left by a write killed long ago
    assert fresh.exists()  # may be another process's write under way


def test_another_authors_name_is_literal_in_the_conflict_warning_and_refusal(app_db: Path) -> None:
    injection = probe.MARKDOWN_INJECTIONS[1]  # [click here](http://example.invalid/phish)
    at = run("pages/correction.py")
    sign_in(at, "Editor Eve")
    study_id = at.selectbox(key="correction.study").value
    store = open_store(f"sqlite:///{app_db}")
    with store.scope() as s:  # someone else saves first, while Eve is still editing
        other = users.get_or_create_user(s, injection, "annotator")
        annotation_versions.save_annotation(
            s, study_id, "lung", np.ones((256, 256), bool), other, "submitted", None
        )
    store.engine.dispose()
    at.run()
    warning = " ".join(w.value for w in at.warning)
    assert f"{md_escape(injection)} saved version" in warning and "](http" not in warning
    at.button(key="correction.save.submitted").click().run()
    refusal = " ".join(e.value for e in at.error)
    assert md_escape(injection) in refusal and "](http" not in refusal


def test_storage_problems_in_plain_words() -> None:
    import errno
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from database.images import PayloadError
    from services.storage import storage_problem

    def sqlite_error(text: str) -> OperationalError:
        return OperationalError("INSERT INTO users ...", {}, sqlite3.OperationalError(text))

    assert "full" in storage_problem(sqlite_error("database or disk is full"))
    assert "read-only" in storage_problem(sqlite_error("attempt to write a readonly database"))
    assert "busy" in storage_problem(sqlite_error("database is locked"))
    assert "full" in storage_problem(OSError(errno.ENOSPC, "No space left on device"))
    assert storage_problem(PayloadError("the file for image 3 is missing")) == MISSING_PAYLOAD
    assert storage_problem(ValueError("not storage")) is None
    for exc in (sqlite_error("disk I/O error"), OSError(errno.EROFS, "ro")):
        assert "INSERT" not in (storage_problem(exc) or "")
