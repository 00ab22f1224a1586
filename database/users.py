"""Users: accounts with argon2id password hashes, and who saved what.

Every function takes a Session; the caller owns the transaction. Managing accounts is for
admins: :func:`create_user` and :func:`set_password` take the acting user (``by``) and refuse
anyone else; ``by=None`` is the operator at the server's command line:

    python -m database.users add NAME --role ROLE        # asks for the password twice
    python -m database.users reset-password NAME
    python -m database.users list
    [--database-url URL]  (default: DATABASE_URL or data/infmap.sqlite)

On a fresh install the first admin is made with ``add NAME --role admin`` (or the app's
one-time prompt, which appears only while no admin account exists). There is no default
password.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Sequence

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from database.models import ROLES, User
from database.versioning import RoleError

MIN_PASSWORD = 10
_HASHER = PasswordHasher()  # argon2id with the library's current recommended parameters


class AccountError(ValueError):
    """A name, role or password that cannot be used; the message is for the user."""


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"A password has at least {MIN_PASSWORD} characters.")
    return _HASHER.hash(password)


def password_matches(user: User | None, password: str) -> bool:
    """True only for a user with a password whose hash matches (constant-time in argon2)."""
    if user is None or not user.password_hash:
        _HASHER.hash("x" * MIN_PASSWORD)  # about the same time whether or not the name exists
        return False
    try:
        return _HASHER.verify(user.password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def _check_admin(by: User | None) -> None:
    if by is not None and by.role != "admin":
        raise RoleError("only an admin may manage user accounts")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)}, not {role!r}")


def create_user(
    session: Session, name: str, role: str, password: str, by: User | None
) -> User:
    """A new account. ``by``: the admin creating it (None: the server's command line)."""
    _check_admin(by)
    name = " ".join(name.split())
    if not name:
        raise AccountError("a user name must not be empty")
    _check_role(role)
    if get_user(session, name) is not None:
        raise AccountError(f"a user called {name!r} exists already")
    user = User(name=name, role=role, password_hash=hash_password(password))
    try:
        with session.begin_nested():
            session.add(user)
    except IntegrityError as exc:  # created concurrently
        raise AccountError(f"a user called {name!r} exists already") from exc
    return user


def set_password(session: Session, name: str, password: str, by: User | None) -> User:
    _check_admin(by)
    user = get_user(session, name)
    if user is None:
        raise AccountError(f"no user called {name!r}")
    user.password_hash = hash_password(password)
    return user


def authenticate(session: Session, name: str, password: str) -> User | None:
    """The user if ``name`` and ``password`` match an account, else None."""
    user = get_user(session, name)
    if not password_matches(user, password):
        return None
    assert user is not None
    if _HASHER.check_needs_rehash(user.password_hash or ""):
        user.password_hash = _HASHER.hash(password)
    return user


def admin_exists(session: Session) -> bool:
    query = select(func.count()).select_from(User).where(
        User.role == "admin", User.password_hash.is_not(None)
    )
    return bool(session.scalar(query))


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.name)))


def get_or_create_user(session: Session, name: str, role: str) -> User:
    """The user called ``name``, created with ``role`` (no password: cannot sign in) if new.

    For importers naming an author. An existing user keeps their role: asking for a different
    one raises ``ValueError``.
    """
    name = name.strip()
    if not name:
        raise ValueError("a user name must not be empty")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    user = get_user(session, name)
    if user is None:
        try:
            with session.begin_nested():
                user = User(name=name, role=role)
                session.add(user)
        except IntegrityError:  # created concurrently by another session
            user = get_user(session, name)
            assert user is not None
    if user.role != role:
        raise ValueError(f"user {name!r} exists with role {user.role!r}, not {role!r}")
    return user


def acting_user(
    session: Session, user_id: int, roles: Sequence[str] | None, doing: str
) -> User:
    """The user doing something, refused (``RoleError``) unless their role is in ``roles``
    (None: any role). Services call it inside the transaction of the change."""
    user = session.get(User, user_id)
    if user is None:
        raise LookupError("the signed-in user no longer exists; sign in again")
    if roles is not None and user.role not in roles:
        raise RoleError(f"only {' or '.join(r + 's' for r in roles)} may {doing}")
    return user


def get_user(session: Session, name: str) -> User | None:
    return session.scalar(select(User).where(User.name == " ".join(name.split())))


# ----------------------------------------------------------------------------- command line
def _ask_password(prompt_password: bool) -> str:
    if not prompt_password:  # piped in (scripts, tests): one line on stdin
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Password again: "):
        raise AccountError("the two passwords differ")
    return first


def main(argv: Sequence[str] | None = None) -> int:
    from database import audit
    from database.session import init_db, session_scope

    parser = argparse.ArgumentParser(prog="python -m database.users",
                                     description="Manage InfMap's local user accounts.")
    parser.add_argument("--database-url", help="default: DATABASE_URL or data/infmap.sqlite")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="create an account (asks for its password)")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=ROLES)
    reset = commands.add_parser("reset-password", help="set a new password (asks for it)")
    reset.add_argument("name")
    commands.add_parser("list", help="names and roles")
    for sub in (add, reset):
        sub.add_argument("--password-stdin", action="store_true",
                         help="read the password from one line of stdin instead of asking")
    args = parser.parse_args(argv)

    engine = init_db(args.database_url)
    try:
        if args.command == "list":
            with session_scope(engine, write=False) as s:
                for user in list_users(s):
                    state = "" if user.password_hash else "  (no password: cannot sign in)"
                    print(f"{user.name}\t{user.role}{state}")
            return 0
        password = _ask_password(not args.password_stdin and sys.stdin.isatty())
        with session_scope(engine) as s:
            if args.command == "add":
                user = create_user(s, args.name, args.role, password, by=None)
                audit.record(s, "user create", None, user_name="command line",
                             detail=f"{user.name} ({user.role})")
                print(f"Created {args.role} {args.name}.")
            else:
                user = set_password(s, args.name, password, by=None)
                audit.record(s, "password reset", None, user_name="command line",
                             detail=user.name)
                print(f"New password set for {args.name}.")
        return 0
    except AccountError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()


if __name__ == "__main__":
    raise SystemExit(main())
