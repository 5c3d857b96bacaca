"""batch jobs, routes, line projects

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
        "batch_jobs",
        sa.Column("job_id", sa.Uuid(), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("project_id", sa.String(63), nullable=False),
        sa.Column("snapshot_id", sa.Text(), nullable=False),
        sa.Column("splits", postgresql.JSONB(), nullable=False),
        sa.Column("model_line", sa.String(63), nullable=False),
        sa.Column("registered_model", sa.Text(), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("chunk_size", sa.Integer(), nullable=False),
        sa.Column("total", sa.Integer()),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("next_chunk", sa.Integer(), nullable=False),
        sa.Column("error_samples", postgresql.JSONB(), nullable=False),
        sa.Column("failure", sa.Text()),
        sa.Column("results_bucket", sa.Text(), nullable=False),
        sa.Column("results_prefix", sa.Text(), nullable=False),
        sa.Column("requested_by", sa.Text(), nullable=False),
        sa.Column("owner", sa.String(128)),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
    )
    op.create_index("batch_jobs_by_state", "batch_jobs", ["state", "created_at"])
    op.create_table(
        "routes",
        sa.Column("model_line", sa.String(63), primary_key=True),
        sa.Column("registered_model", sa.Text(), nullable=False),
        sa.Column("champion_version", sa.String(64)),
        sa.Column("candidate_version", sa.String(64)),
        sa.Column("candidate_percent", sa.Integer(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("rollout_id", sa.Uuid()),
    )
    op.create_table(
        "line_projects",
        sa.Column("model_line", sa.String(63), primary_key=True),
        sa.Column("project_id", sa.String(63), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("line_projects")
    op.drop_table("routes")
    op.drop_index("batch_jobs_by_state", table_name="batch_jobs")
    op.drop_table("batch_jobs")
