"""drift samples, drift state per model line, drift reports

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "drift_samples",
        sa.Column("request_id", sa.Uuid(), primary_key=True),
        sa.Column("project_id", sa.String(63), nullable=False),
        sa.Column("model_line", sa.String(63), nullable=False),
        sa.Column("model_version", sa.Text(), nullable=False),
        sa.Column("served_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "received_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        sa.Column("embedding", sa.LargeBinary()),
        sa.Column("brightness", sa.Float()),
        sa.Column("contrast", sa.Float()),
        sa.Column("width", sa.Integer()),
        sa.Column("height", sa.Integer()),
        sa.Column("predicted_class", sa.Text()),
        sa.Column("confidence", sa.Float()),
        sa.Column("input_sha256", sa.String(64), nullable=False),
        sa.Column("input_key", sa.Text()),
    )
    op.create_index("drift_samples_by_line", "drift_samples", ["model_line", "served_at"])
    op.create_index("drift_samples_by_arrival", "drift_samples", ["model_line", "received_at"])
    op.create_table(
        "drift_lines",
        sa.Column("model_line", sa.String(63), primary_key=True),
        sa.Column("project_id", sa.String(63), nullable=False),
        sa.Column("last_checked_at", sa.DateTime(timezone=True)),
        sa.Column("last_report_id", sa.Uuid()),
        sa.Column("last_action", sa.String(32)),
        sa.Column("last_action_at", sa.DateTime(timezone=True)),
        sa.Column("last_action_version", sa.Text()),
    )
    op.create_table(
        "drift_reports",
        sa.Column("report_id", sa.Uuid(), primary_key=True),
        sa.Column("project_id", sa.String(63), nullable=False),
        sa.Column("model_line", sa.String(63), nullable=False),
        sa.Column("model_version", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("drifted", sa.Boolean(), nullable=False),
        sa.Column("action", sa.String(32)),
        sa.Column("note", sa.Text()),
        sa.Column("event_id", sa.Uuid()),
        sa.Column("report", postgresql.JSONB(), nullable=False),
        sa.Column("plots", postgresql.JSONB(), nullable=False),
    )
    op.create_index("drift_reports_by_project", "drift_reports", ["project_id", "created_at"])


def downgrade() -> None:
    op.drop_table("drift_reports")
    op.drop_table("drift_lines")
    op.drop_table("drift_samples")
