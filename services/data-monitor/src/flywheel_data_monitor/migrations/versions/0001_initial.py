"""projects, decisions, quality reports and quarantined labels

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


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("project_id", sa.String(63), primary_key=True),
        sa.Column("config_revision", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("model_line", sa.String(63)),
        sa.Column("task_type", sa.String(32)),
        sa.Column(
            "class_names",
            postgresql.JSONB(),
            nullable=False,
            server_default=sa.text("'[]'::jsonb"),
        ),
        sa.Column("policy", postgresql.JSONB()),
        sa.Column("head_snapshot_id", sa.Text()),
        sa.Column("head_sequence", sa.BigInteger()),
        sa.Column("trained_snapshot_id", sa.Text()),
        sa.Column("trained_sequence", sa.BigInteger()),
        sa.Column("trained_class_counts", postgresql.JSONB()),
        sa.Column("last_fired_at", sa.DateTime(timezone=True)),
        sa.Column("pending_labels", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("pending_prefilled", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("pending_corrected", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("oldest_pending_at", sa.DateTime(timezone=True)),
        sa.Column("last_batch_event_id", sa.Uuid()),
        sa.Column("last_batch_correlation_id", sa.Uuid()),
        sa.Column(
            "class_counts",
            postgresql.JSONB(),
            nullable=False,
            server_default=sa.text("'{}'::jsonb"),
        ),
        sa.Column("last_evaluation", postgresql.JSONB()),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )
    op.create_index(
        "projects_pending",
        "projects",
        ["project_id"],
        postgresql_where=sa.text("pending_labels > 0"),
    )
    op.create_table(
        "decisions",
        sa.Column("decision_id", sa.Uuid(), primary_key=True),
        sa.Column(
            "project_id", sa.String(63), sa.ForeignKey("projects.project_id"), nullable=False
        ),
        sa.Column("model_line", sa.String(63), nullable=False),
        sa.Column("snapshot_id", sa.Text(), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("trigger", sa.String(32), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("caused_by", sa.Uuid()),
        sa.Column("threshold_event_id", sa.Uuid(), nullable=False),
        sa.Column("labels_since_last", sa.Integer(), nullable=False),
        sa.Column("effective_threshold", sa.Integer(), nullable=False),
        sa.Column("excluded_label_count", sa.Integer(), nullable=False),
        sa.Column("evaluation", postgresql.JSONB(), nullable=False),
    )
    op.create_index("decisions_by_project", "decisions", ["project_id", "decided_at"])
    op.create_table(
        "quality_reports",
        sa.Column("report_id", sa.Uuid(), primary_key=True),
        sa.Column(
            "project_id", sa.String(63), sa.ForeignKey("projects.project_id"), nullable=False
        ),
        sa.Column("batch_id", sa.Uuid(), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("snapshot_id", sa.Text(), nullable=False),
        sa.Column("snapshot_sequence", sa.BigInteger()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("label_count", sa.Integer(), nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.Column("quarantined", sa.Boolean(), nullable=False),
        sa.Column("counted", sa.Boolean(), nullable=False),
        sa.Column("reference_source", sa.String(32), nullable=False),
        sa.Column("checks", postgresql.JSONB(), nullable=False),
        sa.Column("reasons", postgresql.JSONB(), nullable=False),
        sa.UniqueConstraint("project_id", "batch_id", name="quality_reports_one_per_batch"),
    )
    op.create_index("quality_reports_by_project", "quality_reports", ["project_id", "created_at"])
    op.create_table(
        "quarantined_labels",
        sa.Column(
            "project_id", sa.String(63), sa.ForeignKey("projects.project_id"), primary_key=True
        ),
        sa.Column("label_id", sa.Uuid(), primary_key=True),
        sa.Column("batch_id", sa.Uuid(), nullable=False),
        sa.Column(
            "report_id",
            sa.Uuid(),
            sa.ForeignKey("quality_reports.report_id"),
            nullable=False,
        ),
        sa.Column(
            "quarantined_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
    )


def downgrade() -> None:
    op.drop_table("quarantined_labels")
    op.drop_index("quality_reports_by_project", table_name="quality_reports")
    op.drop_table("quality_reports")
    op.drop_index("decisions_by_project", table_name="decisions")
    op.drop_table("decisions")
    op.drop_index("projects_pending", table_name="projects")
    op.drop_table("projects")
