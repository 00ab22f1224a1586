"""Managing local accounts from the app (admins only; ``database.users`` checks the role again)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from database import audit, users
from database.versioning import RoleError
from services.identity import USER_MANAGERS
from services.ingest import SessionFactory


@dataclass(frozen=True)
class AccountOutcome:
    ok: bool
    message: str


def list_accounts(scope: SessionFactory, by_user_id: int) -> list[dict[str, Any]]:
    with scope(write=False) as s:
        users.acting_user(s, by_user_id, USER_MANAGERS, "list user accounts")
        return [{"name": u.name, "role": u.role, "can sign in": bool(u.password_hash),
                 "created": u.created} for u in users.list_users(s)]  # fmt: skip


def create_account(
    scope: SessionFactory, by_user_id: int, name: str, role: str, password: str
) -> AccountOutcome:
    try:
        with scope() as s:
            admin = users.acting_user(s, by_user_id, USER_MANAGERS, "create user accounts")
            user = users.create_user(s, name, role, password, by=admin)
            audit.record(s, "user create", admin, detail=f"{user.name} ({user.role})")
            return AccountOutcome(True, f"Created {user.role} {user.name}.")
    except (users.AccountError, RoleError, LookupError) as exc:
        return AccountOutcome(False, str(exc))


def reset_password(
    scope: SessionFactory, by_user_id: int, name: str, password: str
) -> AccountOutcome:
    try:
        with scope() as s:
            admin = users.acting_user(s, by_user_id, USER_MANAGERS, "reset passwords")
            user = users.set_password(s, name, password, by=admin)
            audit.record(s, "password reset", admin, detail=user.name)
            return AccountOutcome(True, f"New password set for {user.name}.")
    except (users.AccountError, RoleError, LookupError) as exc:
        return AccountOutcome(False, str(exc))
