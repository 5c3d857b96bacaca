"""The workspaces' tables, in the service's own schema (the runtime adds outbox and
processed_messages).

``workspaces`` holds every environment, ended ones included (the API shows them; ``seq``
breaks ties in the queue's order). ``holdings`` is the audit: one row per interval during which
an environment held GPUs, open while it still does; a partial unique index allows one open
interval per environment whatever the code does.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

workspaces = Table(
    "workspaces",
    metadata,
    Column("workspace_id", Uuid, primary_key=True),
    Column("owner", String(255), nullable=False),
    Column("owner_name", String(255)),
    Column("request_id", Uuid),
    Column("spec", JSONB, nullable=False),
    Column("gpu_type", String(63), nullable=False),
    Column("gpu_count", Integer, nullable=False),
    Column("mode", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("seq", BigInteger, Identity(always=False), nullable=False),
    Column("requested_at", DateTime(timezone=True), nullable=False),
    Column("queued_at", DateTime(timezone=True)),
    Column("started_at", DateTime(timezone=True)),
    Column("ready_at", DateTime(timezone=True)),
    Column("expires_at", DateTime(timezone=True)),
    Column("last_activity_at", DateTime(timezone=True)),
    Column("ended_at", DateTime(timezone=True)),
    Column("stop_reason", String(16)),
    Column("connection", JSONB),
    Column("message", Text),
    Column("extensions", Integer, nullable=False, server_default="0"),
    Column("extended_s", Integer, nullable=False, server_default="0"),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index(
        "workspaces_one_per_request",
        "owner",
        "request_id",
        unique=True,
        postgresql_where=text("request_id IS NOT NULL"),
    ),
    Index("workspaces_by_state", "state", "queued_at", "seq"),
    Index("workspaces_by_owner", "owner", "state"),
)

holdings = Table(
    "holdings",
    metadata,
    Column("holding_id", BigInteger, Identity(always=False), primary_key=True),
    Column("workspace_id", Uuid, nullable=False),
    Column("owner", String(255), nullable=False),
    Column("owner_name", String(255)),
    Column("gpu_type", String(63), nullable=False),
    Column("gpu_count", Integer, nullable=False),
    Column("mode", String(16), nullable=False),
    Column("mig_profile", String(16)),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True)),
    Column("reason", String(16)),
    Index(
        "holdings_one_open_per_workspace",
        "workspace_id",
        unique=True,
        postgresql_where=text("ended_at IS NULL"),
    ),
    Index("holdings_by_time", "started_at", "ended_at"),
    Index("holdings_by_owner", "owner", "started_at"),
)
