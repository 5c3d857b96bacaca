"""canaries, windows, recent predictions, checks, timeline, line controls, project lines

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

ACTIVE_WHERE = "state IN ('starting', 'running', 'paused', 'promoting')"


def upgrade() -> None:
    op.create_table(
        "canaries",
        sa.Column("rollout_id", sa.Uuid(), primary_key=True),
        sa.Column("validated_event_id", sa.Uuid(), nullable=False, unique=True),
        sa.Column("correlation_id", sa.Uuid(), nullable=False),
        sa.Column("project_id", sa.String(63), nullable=False),
        sa.Column("model_line", sa.String(63), nullable=False),
        sa.Column("registered_model", sa.Text(), nullable=False),
        sa.Column("candidate_version", sa.String(64), nullable=False),
        sa.Column("champion_version", sa.String(64)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("policy", postgresql.JSONB(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("traffic_percent", sa.Integer(), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("interval_index", sa.Integer(), nullable=False),
        sa.Column("interval_started_at", sa.DateTime(timezone=True)),
        sa.Column("step_started_at", sa.DateTime(timezone=True)),
        sa.Column("passed_in_step", sa.Integer(), nullable=False),
        sa.Column("failed_checks", sa.Integer(), nullable=False),
        sa.Column("checks", sa.Integer(), nullable=False),
        sa.Column("direct", sa.Boolean(), nullable=False),
        sa.Column("reasons", postgresql.JSONB(), nullable=False),
        sa.Column("metrics", postgresql.JSONB(), nullable=False),
        sa.Column("last_step", postgresql.JSONB()),
        sa.Column("decided_by", sa.Text()),
        sa.Column("tidied", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("cleanup_at", sa.DateTime(timezone=True)),
        sa.Column("finalized_at", sa.DateTime(timezone=True)),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )
    op.create_index(
        "canaries_one_active_per_line",
        "canaries",
        ["model_line"],
        unique=True,
        postgresql_where=sa.text(ACTIVE_WHERE),
    )
    op.create_index("canaries_by_line", "canaries", ["model_line", "created_at"])
    op.create_index("canaries_by_state", "canaries", ["state"])
    op.create_index("canaries_by_project", "canaries", ["project_id"])

    op.create_table(
        "windows",
        sa.Column("rollout_id", sa.Uuid(), primary_key=True),
        sa.Column("interval_index", sa.Integer(), primary_key=True),
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("outage_errors", sa.Integer(), nullable=False),
        sa.Column("latency_counts", postgresql.ARRAY(sa.Integer()), nullable=False),
        sa.Column("latency_sum_ms", sa.Float(), nullable=False),
        sa.Column("agreements", sa.Integer(), nullable=False),
        sa.Column("disagreements", sa.Integer(), nullable=False),
        sa.Column("prefilled", sa.Integer(), nullable=False),
        sa.Column("corrected", sa.Integer(), nullable=False),
    )

    op.create_table(
        "recent_predictions",
        sa.Column("rollout_id", sa.Uuid(), primary_key=True),
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("input_sha256", sa.String(64), primary_key=True),
        sa.Column("predicted_class", sa.Text(), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(
        "recent_predictions_by_age", "recent_predictions", ["rollout_id", "version", "seen_at"]
    )

    op.create_table(
        "checks",
        sa.Column("check_id", sa.Uuid(), primary_key=True),
        sa.Column("rollout_id", sa.Uuid(), nullable=False),
        sa.Column("interval_index", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("traffic_percent", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("counted", sa.Boolean(), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("candidate", postgresql.JSONB(), nullable=False),
        sa.Column("champion", postgresql.JSONB(), nullable=False),
        sa.Column("candidate_feedback", postgresql.JSONB(), nullable=False),
        sa.Column("champion_feedback", postgresql.JSONB(), nullable=False),
        sa.Column("results", postgresql.JSONB(), nullable=False),
        sa.Column("reasons", postgresql.JSONB(), nullable=False),
        sa.Column("metrics", postgresql.JSONB(), nullable=False),
    )
    op.create_index("checks_by_rollout", "checks", ["rollout_id", "interval_index"], unique=True)

    op.create_table(
        "timeline",
        sa.Column("entry_id", sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column("model_line", sa.String(63)),
        sa.Column("project_id", sa.String(63)),
        sa.Column("rollout_id", sa.Uuid()),
        sa.Column("correlation_id", sa.Uuid()),
        sa.Column("event_id", sa.Uuid()),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("details", postgresql.JSONB(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("timeline_by_line", "timeline", ["model_line", "at"])
    op.create_index("timeline_by_correlation", "timeline", ["correlation_id"])
    op.create_index(
        "timeline_lineless",
        "timeline",
        ["project_id"],
        postgresql_where=sa.text("model_line IS NULL"),
    )

    op.create_table(
        "line_controls",
        sa.Column("model_line", sa.String(63), primary_key=True),
        sa.Column("frozen", sa.Boolean(), nullable=False),
        sa.Column("changed_by", sa.Text()),
        sa.Column("changed_at", sa.DateTime(timezone=True)),
        sa.Column("reason", sa.Text()),
    )

    op.create_table(
        "project_lines",
        sa.Column("project_id", sa.String(63), primary_key=True),
        sa.Column("model_line", sa.String(63), primary_key=True),
        sa.Column(
            "learned_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )


def downgrade() -> None:
    op.drop_table("project_lines")
    op.drop_table("line_controls")
    op.drop_index("timeline_lineless", table_name="timeline")
    op.drop_index("timeline_by_correlation", table_name="timeline")
    op.drop_index("timeline_by_line", table_name="timeline")
    op.drop_table("timeline")
    op.drop_index("checks_by_rollout", table_name="checks")
    op.drop_table("checks")
    op.drop_index("recent_predictions_by_age", table_name="recent_predictions")
    op.drop_table("recent_predictions")
    op.drop_table("windows")
    op.drop_index("canaries_by_project", table_name="canaries")
    op.drop_index("canaries_by_state", table_name="canaries")
    op.drop_index("canaries_by_line", table_name="canaries")
    op.drop_index("canaries_one_active_per_line", table_name="canaries")
    op.drop_table("canaries")
