"""The trainer dispatch's table, in its own schema (the runtime adds outbox and
processed_messages).

Two partial unique indexes hold the scheduling invariants whatever the code does: a model line
has at most one queued run and at most one run in progress.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
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

training_runs = Table(
    "training_runs",
    metadata,
    Column("run_id", Uuid, primary_key=True),
    Column("trigger_event_id", Uuid, nullable=False, unique=True),
    Column("correlation_id", Uuid, nullable=False),
    Column("causation_id", Uuid),
    Column("source", String(32), nullable=False),
    Column("project_id", String(63), nullable=False),
    Column("model_line", String(63), nullable=False),
    Column("snapshot_id", Text, nullable=False),
    Column("registered_model", String(255), nullable=False),
    Column("reason", String(32), nullable=False),
    Column("decision_id", Uuid),
    Column("excluded_label_ids", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("requested_by", String(255)),
    Column("priority", String(16), nullable=False),
    Column("queue_position", BigInteger, Identity(always=False), nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("heartbeat_at", DateTime(timezone=True)),
    Column("backend", String(32), nullable=False),
    Column("owner", String(200)),
    Column("handle", JSONB),
    Column("command", JSONB),
    Column("log_tail", Text, nullable=False, server_default=""),
    Column("exit_code", Integer),
    Column("failure_reason", Text),
    Column("retryable", Boolean),
    Column("superseded_by", Uuid),
    Column("cancel_requested_at", DateTime(timezone=True)),
    Column("mlflow_run_id", String(64)),
    Column("model_version", String(32)),
    Column("base_model_version", String(32)),
    Column("metrics", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("entry_point", Text),
    Column("hyperparameters", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("nproc_per_node", Integer),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index(
        "training_runs_one_queued_per_line",
        "model_line",
        unique=True,
        postgresql_where=text("state = 'queued'"),
    ),
    Index(
        "training_runs_one_active_per_line",
        "model_line",
        unique=True,
        postgresql_where=text("state IN ('starting', 'running')"),
    ),
    Index("training_runs_by_state", "state", "queue_position"),
    Index("training_runs_by_created", "created_at"),
)
