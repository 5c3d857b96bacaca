"""training runs

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
        "training_runs",
        sa.Column("run_id", sa.Uuid(), primary_key=True),
        sa.Column("trigger_event_id", sa.Uuid(), nullable=False, unique=True),
        sa.Column("correlation_id", sa.Uuid(), nullable=False),
        sa.Column("causation_id", sa.Uuid()),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("project_id", sa.String(63), nullable=False),
        sa.Column("model_line", sa.String(63), nullable=False),
        sa.Column("snapshot_id", sa.Text(), nullable=False),
        sa.Column("registered_model", sa.String(255), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("decision_id", sa.Uuid()),
        sa.Column(
            "excluded_label_ids",
            postgresql.JSONB(),
            nullable=False,
            server_default=sa.text("'[]'::jsonb"),
        ),
        sa.Column("requested_by", sa.String(255)),
        sa.Column("priority", sa.String(16), nullable=False),
        sa.Column("queue_position", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True)),
        sa.Column("backend", sa.String(32), nullable=False),
        sa.Column("owner", sa.String(200)),
        sa.Column("handle", postgresql.JSONB()),
        sa.Column("command", postgresql.JSONB()),
        sa.Column("log_tail", sa.Text(), nullable=False, server_default=""),
        sa.Column("exit_code", sa.Integer()),
        sa.Column("failure_reason", sa.Text()),
        sa.Column("retryable", sa.Boolean()),
        sa.Column("superseded_by", sa.Uuid()),
        sa.Column("cancel_requested_at", sa.DateTime(timezone=True)),
        sa.Column("mlflow_run_id", sa.String(64)),
        sa.Column("model_version", sa.String(32)),
        sa.Column("base_model_version", sa.String(32)),
        sa.Column(
            "metrics", postgresql.JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )
    op.create_index(
        "training_runs_one_queued_per_line",
        "training_runs",
        ["model_line"],
        unique=True,
        postgresql_where=sa.text("state = 'queued'"),
    )
    op.create_index(
        "training_runs_one_active_per_line",
        "training_runs",
        ["model_line"],
        unique=True,
        postgresql_where=sa.text("state IN ('starting', 'running')"),
    )
    op.create_index("training_runs_by_state", "training_runs", ["state", "queue_position"])
    op.create_index("training_runs_by_created", "training_runs", ["created_at"])


def downgrade() -> None:
    op.drop_index("training_runs_by_created", table_name="training_runs")
    op.drop_index("training_runs_by_state", table_name="training_runs")
    op.drop_index("training_runs_one_active_per_line", table_name="training_runs")
    op.drop_index("training_runs_one_queued_per_line", table_name="training_runs")
    op.drop_table("training_runs")
