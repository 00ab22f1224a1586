"""Fine-tuning runs say where they run and that they are alive: the host, a heartbeat, and a
stop request that the run itself picks up, so that an app server on another machine neither
takes a live run for a dead one nor signals a process id that means something else there.

Additive: ``host`` and ``heartbeat`` are NULL for runs recorded before this revision (they were
started on the app's own machine, as then they all were); ``stop_requested`` starts false.

Revision ID: 0005_run_liveness
Revises: 0004_accounts_audit
Create Date: 2026-12-02 14:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_run_liveness"
down_revision: str | None = "0004_accounts_audit"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("finetune_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("host", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("heartbeat", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("stop_requested", sa.Boolean(), nullable=False,
                                      server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("finetune_runs", schema=None) as batch_op:
        batch_op.drop_column("stop_requested")
        batch_op.drop_column("heartbeat")
        batch_op.drop_column("host")
