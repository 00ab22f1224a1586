"""Accounts and the audit trail: the admin role, and an append-only ``audit_events`` table.

Revision ID: 0004_accounts_audit
Revises: 0003_prediction_domain
Create Date: 2026-12-01 23:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_accounts_audit"
down_revision: str | None = "0003_prediction_domain"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_ROLES = "role IN ('annotator', 'radiologist', 'researcher')"
ROLES = "role IN ('annotator', 'radiologist', 'researcher', 'admin')"
ACTIONS = (
    "action IN ('sign-in', 'sign-in refused', 'sign-out', 'view', 'save', 'submit', 'approve', "
    "'send back', 'import', 'export', 'model start', 'model activate', 'user create', "
    "'password reset')"
)
SQLITE_TRIGGERS = [
    f"CREATE TRIGGER audit_events_no_{what} BEFORE {what.upper()} ON audit_events "
    "BEGIN SELECT RAISE(ABORT, 'audit events are append-only'); END"
    for what in ("update", "delete")
]
POSTGRES_TRIGGER = [
    "CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'audit events are append-only'; END $$",
    "CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events "
    "FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()",
]


def _set_roles(check: str) -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_users_role"), type_="check")
        batch_op.create_check_constraint(op.f("ck_users_role"), sa.text(check))


def upgrade() -> None:
    _set_roles(ROLES)
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("user_name", sa.String(length=120), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.CheckConstraint(ACTIONS, name=op.f("ck_audit_events_action")),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"],
                                name=op.f("fk_audit_events_image_id_images")),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"],
                                name=op.f("fk_audit_events_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index("ix_audit_events_at", ["at"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_events_user_id"), ["user_id"], unique=False)
    dialect = op.get_bind().dialect.name
    for statement in {"sqlite": SQLITE_TRIGGERS, "postgresql": POSTGRES_TRIGGER}.get(dialect, []):
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER audit_events_append_only ON audit_events")
        op.execute("DROP FUNCTION audit_events_append_only()")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_events_user_id"))
        batch_op.drop_index("ix_audit_events_at")
    op.drop_table("audit_events")  # SQLite drops its triggers with the table
    _set_roles(OLD_ROLES)
