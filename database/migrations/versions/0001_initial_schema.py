"""Initial schema: users, images, model versions, predictions, annotation versions, fine-tune runs.

Revision ID: 0001
Revises: 
Create Date: 2026-11-22 02:38:28.362490
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('images',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('payload_path', sa.String(length=255), nullable=False),
    sa.Column('payload_sha256', sa.String(length=64), nullable=False),
    sa.Column('display_name', sa.String(length=255), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('metadata', sa.JSON(), nullable=False),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.Column('height', sa.Integer(), nullable=False),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.CheckConstraint("source IN ('upload', 'sample', 'import')", name=op.f('ck_images_source')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_images')),
    sa.UniqueConstraint('sha256', name=op.f('uq_images_sha256'))
    )
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_images_created'), ['created'], unique=False)

    op.create_table('model_versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('version', sa.String(length=120), nullable=False),
    sa.Column('checkpoint_path', sa.String(length=1024), nullable=False),
    sa.Column('checkpoint_sha256', sa.String(length=64), nullable=True),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('lineage', sa.JSON(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('train_minutes', sa.Float(), nullable=True),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['parent_id'], ['model_versions.id'], name=op.f('fk_model_versions_parent_id_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_versions')),
    sa.UniqueConstraint('version', name=op.f('uq_model_versions_version'))
    )
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.create_index('uq_model_versions_one_active', ['active'], unique=True, sqlite_where=sa.text('active'), postgresql_where=sa.text('active'))

    op.create_table('users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=120), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('password_hash', sa.String(length=255), nullable=True),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.CheckConstraint("role IN ('annotator', 'radiologist', 'researcher')", name=op.f('ck_users_role')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('name', name=op.f('uq_users_name'))
    )
    op.create_table('finetune_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('progress', sa.Float(), nullable=False),
    sa.Column('message', sa.Text(), nullable=True),
    sa.Column('pid', sa.Integer(), nullable=True),
    sa.Column('args', sa.JSON(), nullable=False),
    sa.Column('model_version_id', sa.Integer(), nullable=True),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.Column('started', sa.DateTime(), nullable=True),
    sa.Column('finished', sa.DateTime(), nullable=True),
    sa.CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed', 'interrupted')", name=op.f('ck_finetune_runs_status')),
    sa.CheckConstraint('progress >= 0 AND progress <= 1', name=op.f('ck_finetune_runs_progress')),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_finetune_runs_model_version_id_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_finetune_runs'))
    )
    op.create_table('predictions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('model_version_id', sa.Integer(), nullable=False),
    sa.Column('probabilities', sa.JSON(), nullable=False),
    sa.Column('predicted_class', sa.String(length=32), nullable=False),
    sa.Column('confidence', sa.Float(), nullable=False),
    sa.Column('lung_mask_png', sa.LargeBinary(), nullable=False),
    sa.Column('infection_mask_png', sa.LargeBinary(), nullable=False),
    sa.Column('infection_percent', sa.Float(), nullable=False),
    sa.Column('infection_percent_left', sa.Float(), nullable=False),
    sa.Column('infection_percent_right', sa.Float(), nullable=False),
    sa.Column('severity', sa.String(length=32), nullable=False),
    sa.Column('severity_score', sa.Integer(), nullable=False),
    sa.Column('uncertainty', sa.Float(), nullable=False),
    sa.Column('timings', sa.JSON(), nullable=False),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_predictions_image_id_images')),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_predictions_model_version_id_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_predictions')),
    sa.UniqueConstraint('image_id', 'model_version_id', name='uq_predictions_image_model')
    )
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_predictions_image_id'), ['image_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_predictions_model_version_id'), ['model_version_id'], unique=False)

    op.create_table('annotation_versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('mask_png', sa.LargeBinary(), nullable=False),
    sa.Column('author_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('prediction_id', sa.Integer(), nullable=True),
    sa.Column('conflict', sa.Boolean(), nullable=False),
    sa.Column('comment', sa.Text(), nullable=True),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.CheckConstraint("kind IN ('lung', 'infection')", name=op.f('ck_annotation_versions_kind')),
    sa.CheckConstraint("status IN ('draft', 'submitted', 'approved', 'returned')", name=op.f('ck_annotation_versions_status')),
    sa.ForeignKeyConstraint(['author_id'], ['users.id'], name=op.f('fk_annotation_versions_author_id_users')),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_annotation_versions_image_id_images')),
    sa.ForeignKeyConstraint(['parent_id'], ['annotation_versions.id'], name=op.f('fk_annotation_versions_parent_id_annotation_versions')),
    sa.ForeignKeyConstraint(['prediction_id'], ['predictions.id'], name=op.f('fk_annotation_versions_prediction_id_predictions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_annotation_versions'))
    )
    with op.batch_alter_table('annotation_versions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_annotation_versions_author_id'), ['author_id'], unique=False)
        batch_op.create_index('ix_annotation_versions_image_kind', ['image_id', 'kind', 'conflict', 'id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('annotation_versions', schema=None) as batch_op:
        batch_op.drop_index('ix_annotation_versions_image_kind')
        batch_op.drop_index(batch_op.f('ix_annotation_versions_author_id'))

    op.drop_table('annotation_versions')
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_predictions_model_version_id'))
        batch_op.drop_index(batch_op.f('ix_predictions_image_id'))

    op.drop_table('predictions')
    op.drop_table('finetune_runs')
    op.drop_table('users')
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_index('uq_model_versions_one_active', sqlite_where=sa.text('active'), postgresql_where=sa.text('active'))

    op.drop_table('model_versions')
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_images_created'))

    op.drop_table('images')
