"""InfMap: chest X-ray review with a UNet++ model beside the radiologist.

``streamlit run app.py``. This file sets the page up, runs the first-start bootstrap (database,
shipped model version, bundled samples), signs the user in (sidebar: a local account, or OIDC
through ``st.login``) and routes to the pages.
To add a page, append an ``st.Page`` to ``PAGES`` (a missing page file is an error at start,
never a page silently left out).
"""

from __future__ import annotations

import os
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download weights at run time

import streamlit as st  # noqa: E402

# Register the drawing canvas component at start-up, not on the first visit of the correction
# page: registering it during that page's first run made Streamlit show "Page not found".
import streamlit_drawable_canvas  # noqa: E402, F401

from pages import common, panel_chart  # noqa: E402, F401 - panel_chart registers its components
from services import identity, studies  # noqa: E402
from services.storage import storage_problem  # noqa: E402
from services.text import md_escape  # noqa: E402

PAGES = [
    st.Page("pages/worklist.py", title="Worklist", icon=":material/list_alt:", default=True),
    st.Page("pages/review.py", title="Review", icon=":material/radiology:", url_path="review"),
    st.Page("pages/correction.py", title="Correction", icon=":material/brush:", url_path="correct"),
    st.Page("pages/models.py", title="Models", icon=":material/model_training:", url_path="models"),
    st.Page("pages/evaluation.py", title="Evaluation", icon=":material/analytics:",
            url_path="evaluation"),
    st.Page("pages/admin.py", title="Admin", icon=":material/admin_panel_settings:",
            url_path="admin"),
]


def _form_error(key: str, action: Callable[[], object]) -> None:
    """Run a sign-in form's action; its error (in plain words) goes under the form."""
    try:
        action()
    except ValueError as exc:  # IdentityError
        st.session_state[key] = str(exc)
    except Exception as exc:  # a read-only or full database: a plain message, no traceback
        common.log.exception("sign-in failed")
        st.session_state[key] = storage_problem(exc) or "Signing in failed."
    else:
        st.session_state.pop(key, None)
    st.session_state.pop("identity.password", None)  # never kept in the session state
    st.session_state.pop("identity.admin_password", None)
    st.session_state.pop("identity.admin_repeat", None)


def _sign_in() -> None:
    """Form callback (runs before the script, so the page renders signed in at once). All
    reads of the session state come first (see ``common.kept``)."""
    state = common.identity_state()
    name = st.session_state.get("identity.name", "")
    password = st.session_state.get("identity.password", "")
    _form_error("identity.error", lambda: identity.sign_in(state, name, password, common.db))


def _first_admin() -> None:
    state = common.identity_state()
    name = st.session_state.get("identity.admin_name", "")
    password = st.session_state.get("identity.admin_password", "")
    repeat = st.session_state.get("identity.admin_repeat", "")
    _form_error("identity.admin_error", lambda: identity.create_first_admin(
        state, name, password, repeat, common.db,
    ))


def _oidc_configured() -> bool:
    """``st.login`` is the production option once ``[auth]`` is in .streamlit/secrets.toml."""
    try:
        return "auth" in st.secrets
    except Exception:  # no secrets file at all
        return False


def _oidc_sign_in() -> None:
    """After the provider's log-in: the account of that e-mail, if an admin created one."""
    if not st.user.is_logged_in or common.user() is not None:
        return
    name = str(st.user.get("email") or st.user.get("name") or "")
    state = common.identity_state()
    _form_error("identity.error", lambda: identity.sign_in_external(
        state, name, common.db, "OIDC"))


def _sign_out() -> None:
    identity.sign_out(common.identity_state(), common.db)
    if _oidc_configured() and st.user.is_logged_in:
        st.logout()


def identity_sidebar() -> None:
    """Log-in before any edit (local accounts, or OIDC). The seam is services.identity."""
    with st.sidebar:
        if _oidc_configured():
            _oidc_sign_in()
        user = common.user()
        if user is not None:
            st.success(
                f"Signed in as {md_escape(user.name)} ({user.role})", icon=":material/person:"
            )
            st.button("Sign out", key="identity.sign_out", on_click=_sign_out)
            return
        if common.identity_state().pop(identity.TIMED_OUT_KEY, False):
            st.info("Your session timed out: sign in again.", icon=":material/timer_off:")
        if _oidc_configured():
            st.button("Sign in with your organisation's account", key="identity.oidc",
                      on_click=st.login)
        else:
            st.markdown("**Sign in** before any edit.")
            with st.form("identity", border=False):
                st.text_input("Your name", max_chars=identity.MAX_NAME, key="identity.name")
                st.text_input("Password", type="password", key="identity.password")
                st.form_submit_button("Sign in", on_click=_sign_in)
        if st.session_state.get("identity.error"):
            st.error(st.session_state["identity.error"])
        if identity.needs_first_admin(common.db):
            first_admin_form()


def first_admin_form() -> None:
    """The one-time prompt of a fresh install: gone once an admin account exists."""
    st.markdown("**First start: create the admin account.** Or, at the server: "
                "`python -m database.users add NAME --role admin`.")
    with st.form("identity.first_admin", border=True):
        st.text_input("Admin name", max_chars=identity.MAX_NAME, key="identity.admin_name")
        st.text_input("Admin password", type="password", key="identity.admin_password")
        st.text_input("Admin password again", type="password", key="identity.admin_repeat")
        st.form_submit_button("Create the admin account", on_click=_first_admin)
    if st.session_state.get("identity.admin_error"):
        st.error(st.session_state["identity.admin_error"])


def main() -> None:
    st.set_page_config(page_title="InfMap", page_icon=":material/pulmonology:", layout="wide")
    navigation = st.navigation(PAGES)
    try:
        common.bootstrap()
    except Exception as exc:  # no traceback in the UI; the server log has it
        common.log.exception("bootstrap failed")
        st.error(
            storage_problem(exc)
            or f"InfMap could not open its database or model ({type(exc).__name__})."
        )
        st.stop()
    identity_sidebar()
    with st.sidebar:
        model = studies.active_model(common.db)
        st.caption(f"Model version: {model.version if model else 'none'}")
    try:
        navigation.run()
    except Exception as exc:  # every page: storage failures in plain words, never a traceback
        common.log.exception("page failed")
        st.error(
            storage_problem(exc) or "Something went wrong on this page; the server log has it.",
            icon=":material/error:",
        )


main()
