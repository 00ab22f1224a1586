"""Helpers for the AppTest modules (streamlit.testing.v1): run the app, sign in, open the
database the app uses. The ``app_env`` fixture (a copy of a started database) is in conftest.

The canvas component does not render under AppTest (it returns its default: no strokes), so a
save there stores the mask the page started from; drawing is covered by tests/browser.
"""

from __future__ import annotations

from pathlib import Path

from accounts import sign_in_apptest
from streamlit.testing.v1 import AppTest

from database.session import init_db, session_scope

APP = str(Path(__file__).resolve().parent.parent / "app.py")
TIMEOUT = 180  # first run: migrations, model load, six sample predictions on a busy machine


def run_app(page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    if page is not None:
        at.switch_page(page).run()
        assert not at.exception, at.exception
    return at


IDENTITY_STATE = "infmap.identity.state"  # pages.common.identity_state's key


def signed_in(at: AppTest) -> object | None:
    """The Identity this AppTest session is signed in with (None: signed out)."""
    if IDENTITY_STATE not in at.session_state:
        return None
    return at.session_state[IDENTITY_STATE].get("infmap.identity")


def sign_in(at: AppTest, name: str, role: str = "annotator") -> None:
    """Create the account ``name`` (``role``) in the test's database and sign in with it."""
    sign_in_apptest(at, name, role)
    assert not at.exception, at.exception
    assert signed_in(at).name == name


def scope_for(url: str):  # noqa: ANN201
    engine = init_db(url)

    def scope(write: bool = True):  # noqa: ANN202
        return session_scope(engine, write=write)

    return scope
