"""Log-in in the app under AppTest (issue 15): the one-time first-admin prompt of a fresh
install, a wrong password refused, the Admin page for admins only."""

from __future__ import annotations

from accounts import TEST_PASSWORD, ensure_account, sign_in_apptest
from app_helpers import run_app, sign_in, signed_in

from database import audit
from database.session import init_db, session_scope


def test_fresh_install_asks_for_the_first_admin_once(app_env: str) -> None:
    at = run_app()
    at.sidebar.text_input(key="identity.admin_name").input("Root Admin")
    at.sidebar.text_input(key="identity.admin_password").input(TEST_PASSWORD)
    at.sidebar.text_input(key="identity.admin_repeat").input(TEST_PASSWORD)
    at.sidebar.button[1].click().run()  # the first-admin form's button (the sign-in form's is 0)
    assert not at.exception, at.exception
    assert signed_in(at).role == "admin"
    at.switch_page("pages/admin.py").run()
    assert not at.exception, at.exception
    assert {"User accounts", "Audit trail"} <= {h.value for h in at.subheader}
    again = run_app()  # another browser: the prompt is gone
    assert "identity.admin_name" not in [t.key for t in again.sidebar.text_input]


def test_wrong_password_is_refused_and_recorded(app_env: str) -> None:
    ensure_account(app_env, "Ann Wrong", "annotator")
    at = run_app()
    sign_in_apptest(at, "Ann Wrong", password="not the password", create=False)
    assert not at.exception, at.exception
    assert at.session_state["identity.error"] == "Wrong name or password."
    assert signed_in(at) is None
    assert "identity.password" not in at.session_state  # the typed password is not kept
    engine = init_db(app_env)
    try:
        with session_scope(engine, write=False) as s:
            assert [(e.user_name, e.action) for e in audit.list_events(s)][0] == (
                "Ann Wrong", "sign-in refused")
    finally:
        engine.dispose()


def test_admin_page_is_for_admins_only(app_env: str) -> None:
    at = run_app()
    sign_in(at, "Rita Radiologist", "radiologist")
    at.switch_page("pages/admin.py").run()
    assert not at.exception, at.exception
    assert any("Admins only" in w.value for w in at.warning)
    assert not at.dataframe and not at.subheader
