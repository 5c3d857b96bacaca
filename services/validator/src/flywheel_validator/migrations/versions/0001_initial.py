"""validations

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
        "validations",
        sa.Column("validation_id", sa.Uuid(), primary_key=True),
        sa.Column("event_id", sa.Uuid(), nullable=False, unique=True),
        sa.Column("correlation_id", sa.Uuid(), nullable=False),
        sa.Column("validated_event_id", sa.Uuid(), nullable=False),
        sa.Column("project_id", sa.String(63), nullable=False),
        sa.Column("model_line", sa.String(63), nullable=False),
        sa.Column("registered_model", sa.Text(), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("champion_version", sa.String(64)),
        sa.Column("snapshot_id", sa.Text(), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("test_images", sa.Integer(), nullable=False),
        sa.Column("candidate_metrics", postgresql.JSONB(), nullable=False),
        sa.Column("champion_metrics", postgresql.JSONB(), nullable=False),
        sa.Column("reasons", postgresql.JSONB(), nullable=False),
        sa.Column("gates", postgresql.JSONB(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=False),
    )
    op.create_index("validations_by_model_line", "validations", ["model_line", "created_at"])
    op.create_index(
        "validations_by_version", "validations", ["registered_model", "model_version"]
    )


def downgrade() -> None:
    op.drop_index("validations_by_version", table_name="validations")
    op.drop_index("validations_by_model_line", table_name="validations")
    op.drop_table("validations")
