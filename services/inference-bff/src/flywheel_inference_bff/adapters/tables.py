"""The BFF's tables, in its own schema (the runtime adds outbox and processed_messages)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

batch_jobs = Table(
    "batch_jobs",
    metadata,
    Column("job_id", Uuid, primary_key=True),
    Column("state", String(16), nullable=False),
    Column("project_id", String(63), nullable=False),
    Column("snapshot_id", Text, nullable=False),
    Column("splits", JSONB, nullable=False),
    Column("model_line", String(63), nullable=False),
    Column("registered_model", Text, nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("chunk_size", Integer, nullable=False),
    Column("total", Integer),
    Column("done", Integer, nullable=False),
    Column("errors", Integer, nullable=False),
    Column("next_chunk", Integer, nullable=False),
    Column("error_samples", JSONB, nullable=False),
    Column("failure", Text),
    Column("results_bucket", Text, nullable=False),
    Column("results_prefix", Text, nullable=False),
    Column("requested_by", Text, nullable=False),
    Column("owner", String(128)),
    Column("attempts", Integer, nullable=False),
    Column("heartbeat_at", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    Index("batch_jobs_by_state", "state", "created_at"),
)

routes = Table(
    "routes",
    metadata,
    Column("model_line", String(63), primary_key=True),
    Column("registered_model", Text, nullable=False),
    Column("champion_version", String(64)),
    Column("candidate_version", String(64)),
    Column("candidate_percent", Integer, nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("sequence", BigInteger, nullable=False),
    Column("rollout_id", Uuid),
)

line_projects = Table(
    "line_projects",
    metadata,
    Column("model_line", String(63), primary_key=True),
    Column("project_id", String(63), nullable=False),
)
