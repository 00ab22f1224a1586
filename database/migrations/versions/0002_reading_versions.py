"""Reading versions: the reader's label and finding per study, append-only like the masks.

Revision ID: 0002_reading_versions
Revises: 0001
Create Date: 2026-12-01 22:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_reading_versions"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LABELS = "label IN ('COVID-19', 'Non-COVID', 'Normal', 'other finding', 'not assessable')"
STATUSES = "status IN ('draft', 'submitted', 'approved', 'returned')"


def upgrade() -> None:
    op.create_table(
        "reading_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=32), nullable=False),
        sa.Column("finding", sa.Text(), nullable=True),
        sa.Column("author_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("prediction_id", sa.Integer(), nullable=True),
        sa.Column("conflict", sa.Boolean(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.CheckConstraint(LABELS, name=op.f("ck_reading_versions_label")),
        sa.CheckConstraint(STATUSES, name=op.f("ck_reading_versions_status")),
        sa.ForeignKeyConstraint(["author_id"], ["users.id"],
                                name=op.f("fk_reading_versions_author_id_users")),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"],
                                name=op.f("fk_reading_versions_image_id_images")),
        sa.ForeignKeyConstraint(["parent_id"], ["reading_versions.id"],
                                name=op.f("fk_reading_versions_parent_id_reading_versions")),
        sa.ForeignKeyConstraint(["prediction_id"], ["predictions.id"],
                                name=op.f("fk_reading_versions_prediction_id_predictions")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reading_versions")),
    )
    with op.batch_alter_table("reading_versions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_reading_versions_author_id"), ["author_id"],
                              unique=False)
        batch_op.create_index("ix_reading_versions_image", ["image_id", "conflict", "id"],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table("reading_versions", schema=None) as batch_op:
        batch_op.drop_index("ix_reading_versions_image")
        batch_op.drop_index(batch_op.f("ix_reading_versions_author_id"))
    op.drop_table("reading_versions")
