"""projects, labels, label history, snapshots and Label Studio annotations

Revision ID: 0001
Revises:
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _label_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("image_key", sa.Text(), nullable=False),
        sa.Column("split", sa.String(16), nullable=False),
        sa.Column("class_name", sa.Text(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("prediction_id", sa.Text()),
        sa.Column("model_version", sa.Text()),
        sa.Column("predicted_class", sa.Text()),
        sa.Column("confidence", sa.Float()),
        sa.Column("corrected", sa.Boolean(), nullable=False),
        sa.Column("labeler", sa.Text()),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("external_id", sa.Text()),
        sa.Column("snapshot_id", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("project_id", sa.String(63), primary_key=True),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("task_type", sa.String(32), nullable=False),
        sa.Column("class_names", postgresql.JSONB(), nullable=False),
        sa.Column("model_line", sa.String(63), nullable=False),
        sa.Column("policy", postgresql.JSONB(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("head_snapshot_id", sa.Text()),
        sa.Column("head_sequence", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("label_count", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column(
            "class_counts",
            postgresql.JSONB(),
            nullable=False,
            server_default=sa.text("'{}'::jsonb"),
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "labels",
        sa.Column("label_id", sa.Uuid(), primary_key=True),
        sa.Column("position", sa.BigInteger(), sa.Identity(), nullable=False, unique=True),
        sa.Column(
            "project_id",
            sa.String(63),
            sa.ForeignKey("projects.project_id"),
            nullable=False,
        ),
        *_label_columns(),
        sa.UniqueConstraint("project_id", "image_sha256", name="labels_one_per_image"),
    )
    op.create_index("labels_by_project", "labels", ["project_id", "position"])
    op.create_table(
        "label_history",
        sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column("label_id", sa.Uuid(), nullable=False),
        sa.Column("project_id", sa.String(63), nullable=False),
        *_label_columns(),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("superseded_in", sa.Text(), nullable=False),
        sa.Column("superseded_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("label_history_by_label", "label_history", ["label_id", "revision"])
    op.create_table(
        "snapshots",
        sa.Column("snapshot_id", sa.Text(), primary_key=True),
        sa.Column(
            "project_id",
            sa.String(63),
            sa.ForeignKey("projects.project_id"),
            nullable=False,
        ),
        sa.Column("parent_snapshot_id", sa.Text()),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("label_count", sa.BigInteger(), nullable=False),
        sa.Column("class_counts", postgresql.JSONB(), nullable=False),
        sa.Column("batch_id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("upserted", sa.Integer(), nullable=False),
        sa.Column("deleted", sa.Integer(), nullable=False),
        sa.UniqueConstraint("project_id", "sequence", name="snapshots_sequence"),
    )
    op.create_table(
        "label_studio_annotations",
        sa.Column("project_id", sa.String(63), primary_key=True),
        sa.Column("annotation_id", sa.BigInteger(), primary_key=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("label_id", sa.Uuid()),
        sa.Column("image_sha256", sa.String(64)),
        sa.Column("deleted", sa.Boolean(), nullable=False, server_default="false"),
    )


def downgrade() -> None:
    op.drop_table("label_studio_annotations")
    op.drop_table("snapshots")
    op.drop_index("label_history_by_label", table_name="label_history")
    op.drop_table("label_history")
    op.drop_index("labels_by_project", table_name="labels")
    op.drop_table("labels")
    op.drop_table("projects")
