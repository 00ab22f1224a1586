"""Admin: user accounts and the audit trail (filters, CSV download). Admins only: the page
shows nothing to anyone else, and the services refuse them too."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import streamlit as st

from pages import common
from services import accounts, audit_trail, display, identity


def accounts_section(user: identity.Identity) -> None:
    st.subheader("User accounts")
    st.dataframe(pd.DataFrame(accounts.list_accounts(common.db, user.user_id)),
                 hide_index=True, width="stretch", placeholder=display.MISSING)
    left, right = st.columns(2)
    with left, st.form("admin.create", clear_on_submit=True):
        st.markdown("**Create an account**")
        name = st.text_input("Name", max_chars=identity.MAX_NAME, key="admin.new_name")
        role = st.selectbox("Role", identity.ROLES, key="admin.new_role",
                            help="; ".join(f"{r}: {h}" for r, h in identity.ROLE_HELP.items()))
        password = st.text_input("Initial password", type="password", key="admin.new_password")
        if st.form_submit_button("Create account"):
            outcome = accounts.create_account(common.db, user.user_id, name, role, password)
            (st.success if outcome.ok else st.error)(outcome.message)
    with right, st.form("admin.reset", clear_on_submit=True):
        st.markdown("**Reset a password**")
        names = [a["name"] for a in accounts.list_accounts(common.db, user.user_id)]
        who = st.selectbox("Account", names, key="admin.reset_name")
        new = st.text_input("New password", type="password", key="admin.reset_password")
        if st.form_submit_button("Set password") and who:
            outcome = accounts.reset_password(common.db, user.user_id, who, new)
            (st.success if outcome.ok else st.error)(outcome.message)


def audit_section(user: identity.Identity) -> None:
    st.subheader("Audit trail")
    c1, c2, c3, c4 = st.columns([2, 3, 2, 1])
    everyone = "(everyone)"
    who = c1.selectbox("User", [everyone, *audit_trail.user_names(common.db, user.user_id)],
                       key="admin.audit_user")
    actions = c2.multiselect("Actions", audit_trail.ACTIONS, key="admin.audit_actions",
                             placeholder="all actions")
    today = datetime.now(UTC).date()
    days = c3.date_input("Days (UTC)", (today - timedelta(days=30), today),
                         key="admin.audit_days")
    study = c4.number_input("Study #", min_value=0, value=0, step=1, key="admin.audit_study",
                            help="0: every study")
    since, until = (days if isinstance(days, tuple) and len(days) == 2 else (None, None))
    rows = audit_trail.events(
        common.db, user.user_id, None if who == everyone else who, tuple(actions),
        since, until, int(study) or None,
    )  # fmt: skip
    st.caption(f"{len(rows)} events, newest first.")
    st.dataframe(pd.DataFrame(rows, columns=audit_trail.COLUMNS), hide_index=True,
                 width="stretch", placeholder=display.MISSING)
    st.download_button("Download the audit trail (CSV)", audit_trail.to_csv(rows),
                       "infmap-audit.csv", "text/csv", key="admin.audit_csv",
                       icon=":material/download:")


def main() -> None:
    st.title("Admin")
    user = common.user()
    if not identity.can_manage_users(user):
        st.warning("Admins only: sign in with an admin account.", icon=":material/lock:")
        return
    assert user is not None
    accounts_section(user)
    audit_section(user)


main()
