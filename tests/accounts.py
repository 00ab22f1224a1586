"""Local accounts for the app tests: the account a test signs in with is created first, in the
test's own database, the way an admin would (``database.users.create_user``)."""

from __future__ import annotations

import os

from database import users
from database.session import init_db, session_scope

TEST_PASSWORD = "test-password-1234"


def ensure_account(
    database_url: str | None, name: str, role: str = "annotator", password: str = TEST_PASSWORD
) -> None:
    """The account ``name`` with ``role`` and ``password`` (created if missing)."""
    engine = init_db(database_url or os.environ["DATABASE_URL"])
    try:
        with session_scope(engine) as s:
            user = users.get_user(s, name)
            if user is None:
                users.create_user(s, name, role, password, by=None)
            elif user.role != role:
                raise AssertionError(f"test account {name!r} exists as {user.role}, not {role}")
    finally:
        engine.dispose()


def sign_in_apptest(at, name: str, role: str = "annotator", password: str = TEST_PASSWORD,
                    create: bool = True) -> None:  # noqa: ANN001
    """Fill the sidebar's sign-in form of an AppTest and submit it."""
    if create:
        ensure_account(None, name, role)
    at.sidebar.text_input(key="identity.name").input(name)
    at.sidebar.text_input(key="identity.password").input(password)
    at.sidebar.button[0].click().run()
