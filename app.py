"""InfMap: chest X-ray review with a UNet++ model beside the radiologist.

``streamlit run app.py``. This file sets the page up, runs the first-start bootstrap (database,
shipped model version, bundled samples), asks who the user is (sidebar) and routes to the pages.
To add a page, append an ``st.Page`` to ``PAGES`` (a missing page file is an error at start,
never a page silently left out).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download weights at run time

import streamlit as st  # noqa: E402

# Register the drawing canvas component at start-up, not on the first visit of the correction
# page: registering it during that page's first run made Streamlit show "Page not found".
import streamlit_drawable_canvas  # noqa: E402, F401

from pages import common  # noqa: E402
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
]


def _sign_in() -> None:
    """Form callback (runs before the script, so the page renders signed in at once)."""
    try:
        identity.sign_in(
            st.session_state,
            st.session_state.get("identity.name", ""),
            st.session_state.get("identity.role", identity.ROLES[0]),
            common.db,
        )
    except ValueError as exc:  # IdentityError, or the name exists with another role
        st.session_state["identity.error"] = str(exc)
    except Exception as exc:  # a read-only or full database: a plain message, no traceback
        common.log.exception("sign-in failed")
        st.session_state["identity.error"] = storage_problem(exc) or "Signing in failed."
    else:
        st.session_state.pop("identity.error", None)


def identity_sidebar() -> None:
    """Name + role before any edit. The seam for a real log-in is services.identity."""
    with st.sidebar:
        user = common.user()
        if user is not None:
            st.success(
                f"Signed in as {md_escape(user.name)} ({user.role})", icon=":material/person:"
            )
            st.button(
                "Sign out",
                key="identity.sign_out",
                on_click=identity.sign_out,
                args=(st.session_state,),
            )
            return
        st.markdown("**Who are you?** Needed before any edit.")
        with st.form("identity", border=False):
            st.text_input("Your name", max_chars=identity.MAX_NAME, key="identity.name")
            st.selectbox(
                "Role",
                identity.ROLES,
                key="identity.role",
                help="; ".join(f"{r}: {h}" for r, h in identity.ROLE_HELP.items()),
            )
            st.form_submit_button("Sign in", on_click=_sign_in)
        if st.session_state.get("identity.error"):
            st.error(st.session_state["identity.error"])


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
