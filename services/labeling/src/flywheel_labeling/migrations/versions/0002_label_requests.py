"""label_requests: the needs-label queue that labels.requested fills

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "label_requests",
        sa.Column("entry_id", sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column("project_id", sa.String(63), nullable=False),
        sa.Column("request_id", sa.Uuid(), nullable=False),
        sa.Column("report_id", sa.Uuid()),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("input_sha256", sa.String(64), nullable=False),
        sa.Column("image_key", sa.Text(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("predicted_class", sa.Text()),
        sa.Column("confidence", sa.Float()),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("labeled_label_id", sa.Uuid()),
        sa.CheckConstraint(
            "status IN ('open', 'labeled', 'dismissed')", name="label_requests_status"
        ),
    )
    op.create_index(
        "label_requests_one_open",
        "label_requests",
        ["project_id", "input_sha256"],
        unique=True,
        postgresql_where=sa.text("status = 'open'"),
    )
    op.create_index(
        "label_requests_queue",
        "label_requests",
        ["project_id", "status", sa.text("score DESC"), "created_at", "entry_id"],
    )
    op.create_index("label_requests_by_image", "label_requests", ["project_id", "input_sha256"])


def downgrade() -> None:
    op.drop_index("label_requests_by_image", table_name="label_requests")
    op.drop_index("label_requests_queue", table_name="label_requests")
    op.drop_index("label_requests_one_open", table_name="label_requests")
    op.drop_table("label_requests")
