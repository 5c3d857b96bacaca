"""windows.unavailable_errors: requests that never reached a model (inference server unreachable)

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
    # Windows written before the BFF marked them counted none.
    op.add_column(
        "windows",
        sa.Column("unavailable_errors", sa.Integer(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_column("windows", "unavailable_errors")
