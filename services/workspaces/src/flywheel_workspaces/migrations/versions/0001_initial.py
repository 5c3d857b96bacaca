"""environments and their GPU holding intervals

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
        "workspaces",
        sa.Column("workspace_id", sa.Uuid(), primary_key=True),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("owner_name", sa.String(255)),
        sa.Column("request_id", sa.Uuid()),
        sa.Column("spec", postgresql.JSONB(), nullable=False),
        sa.Column("gpu_type", sa.String(63), nullable=False),
        sa.Column("gpu_count", sa.Integer(), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("seq", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("queued_at", sa.DateTime(timezone=True)),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("ready_at", sa.DateTime(timezone=True)),
        sa.Column("expires_at", sa.DateTime(timezone=True)),
        sa.Column("last_activity_at", sa.DateTime(timezone=True)),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
        sa.Column("stop_reason", sa.String(16)),
        sa.Column("connection", postgresql.JSONB()),
        sa.Column("message", sa.Text()),
        sa.Column("extensions", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("extended_s", sa.Integer(), nullable=False, server_default="0"),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )
    op.create_index(
        "workspaces_one_per_request",
        "workspaces",
        ["owner", "request_id"],
        unique=True,
        postgresql_where=sa.text("request_id IS NOT NULL"),
    )
    op.create_index("workspaces_by_state", "workspaces", ["state", "queued_at", "seq"])
    op.create_index("workspaces_by_owner", "workspaces", ["owner", "state"])
    op.create_table(
        "holdings",
        sa.Column(
            "holding_id", sa.BigInteger(), sa.Identity(always=False), primary_key=True
        ),
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("owner_name", sa.String(255)),
        sa.Column("gpu_type", sa.String(63), nullable=False),
        sa.Column("gpu_count", sa.Integer(), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("mig_profile", sa.String(16)),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
        sa.Column("reason", sa.String(16)),
    )
    op.create_index(
        "holdings_one_open_per_workspace",
        "holdings",
        ["workspace_id"],
        unique=True,
        postgresql_where=sa.text("ended_at IS NULL"),
    )
    op.create_index("holdings_by_time", "holdings", ["started_at", "ended_at"])
    op.create_index("holdings_by_owner", "holdings", ["owner", "started_at"])


def downgrade() -> None:
    op.drop_index("holdings_by_owner", table_name="holdings")
    op.drop_index("holdings_by_time", table_name="holdings")
    op.drop_index("holdings_one_open_per_workspace", table_name="holdings")
    op.drop_table("holdings")
    op.drop_index("workspaces_by_owner", table_name="workspaces")
    op.drop_index("workspaces_by_state", table_name="workspaces")
    op.drop_index("workspaces_one_per_request", table_name="workspaces")
    op.drop_table("workspaces")
