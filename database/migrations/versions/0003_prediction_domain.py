"""Predictions carry the out-of-domain score and flag (model 2.0.0's calibration).

Additive: two nullable columns. Predictions stored before this revision, and those of a
checkpoint without an out-of-domain reference (1.0.0), keep NULL ("not scored").

Revision ID: 0003_prediction_domain
Revises: 0002_reading_versions
Create Date: 2026-12-01 22:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003_prediction_domain'
down_revision: str | None = '0002_reading_versions'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('ood_score', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('in_domain', sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.drop_column('in_domain')
        batch_op.drop_column('ood_score')
