"""a run's own entry point, hyperparameters and processes per node

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
    op.add_column("training_runs", sa.Column("entry_point", sa.Text()))
    op.add_column(
        "training_runs",
        sa.Column(
            "hyperparameters",
            postgresql.JSONB(),
            nullable=False,
            server_default=sa.text("'{}'::jsonb"),
        ),
    )
    op.add_column("training_runs", sa.Column("nproc_per_node", sa.Integer()))


def downgrade() -> None:
    op.drop_column("training_runs", "nproc_per_node")
    op.drop_column("training_runs", "hyperparameters")
    op.drop_column("training_runs", "entry_point")
