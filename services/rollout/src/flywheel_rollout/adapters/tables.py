"""The rollout's tables, in its own schema (the runtime adds outbox and processed_messages)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
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
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

metadata = MetaData()

ACTIVE_WHERE = "state IN ('starting', 'running', 'paused', 'promoting')"
"""The states of a canary in progress; the database allows one per model line."""

canaries = Table(
    "canaries",
    metadata,
    Column("rollout_id", Uuid, primary_key=True),
    Column("validated_event_id", Uuid, nullable=False, unique=True),
    Column("correlation_id", Uuid, nullable=False),
    Column("project_id", String(63), nullable=False),
    Column("model_line", String(63), nullable=False),
    Column("registered_model", Text, nullable=False),
    Column("candidate_version", String(64), nullable=False),
    Column("champion_version", String(64)),
    Column("state", String(16), nullable=False),
    Column("policy", JSONB, nullable=False),
    Column("step", Integer, nullable=False),
    Column("traffic_percent", Integer, nullable=False),
    Column("sequence", Integer, nullable=False),
    Column("interval_index", Integer, nullable=False),
    Column("interval_started_at", DateTime(timezone=True)),
    Column("step_started_at", DateTime(timezone=True)),
    Column("passed_in_step", Integer, nullable=False),
    Column("failed_checks", Integer, nullable=False),
    Column("checks", Integer, nullable=False),
    Column("direct", Boolean, nullable=False),
    Column("reasons", JSONB, nullable=False),
    Column("metrics", JSONB, nullable=False),
    Column("last_step", JSONB),
    Column("decided_by", Text),
    Column("tidied", Boolean, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("cleanup_at", DateTime(timezone=True)),
    Column("finalized_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index(
        "canaries_one_active_per_line",
        "model_line",
        unique=True,
        postgresql_where=text(ACTIVE_WHERE),
    ),
    Index("canaries_by_line", "model_line", "created_at"),
    Index("canaries_by_state", "state"),
    Index("canaries_by_project", "project_id"),
)

windows = Table(
    "windows",
    metadata,
    Column("rollout_id", Uuid, primary_key=True),
    Column("interval_index", Integer, primary_key=True),
    Column("version", String(64), primary_key=True),
    Column("requests", Integer, nullable=False),
    Column("errors", Integer, nullable=False),
    Column("outage_errors", Integer, nullable=False),
    Column("unavailable_errors", Integer, nullable=False, server_default="0"),
    Column("latency_counts", ARRAY(Integer), nullable=False),
    Column("latency_sum_ms", Float, nullable=False),
    Column("agreements", Integer, nullable=False),
    Column("disagreements", Integer, nullable=False),
    Column("prefilled", Integer, nullable=False),
    Column("corrected", Integer, nullable=False),
)
"""One row per canary, interval and version: bounded however much traffic flows."""

recent_predictions = Table(
    "recent_predictions",
    metadata,
    Column("rollout_id", Uuid, primary_key=True),
    Column("version", String(64), primary_key=True),
    Column("input_sha256", String(64), primary_key=True),
    Column("predicted_class", Text, nullable=False),
    Column("seen_at", DateTime(timezone=True), nullable=False),
    Index("recent_predictions_by_age", "rollout_id", "version", "seen_at"),
)
"""The latest inputs each version answered during a canary, pruned to a fixed number."""

checks = Table(
    "checks",
    metadata,
    Column("check_id", Uuid, primary_key=True),
    Column("rollout_id", Uuid, nullable=False),
    Column("interval_index", Integer, nullable=False),
    Column("step", Integer, nullable=False),
    Column("traffic_percent", Integer, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True), nullable=False),
    Column("status", String(16), nullable=False),
    Column("counted", Boolean, nullable=False),
    Column("action", String(16), nullable=False),
    Column("candidate", JSONB, nullable=False),
    Column("champion", JSONB, nullable=False),
    Column("candidate_feedback", JSONB, nullable=False),
    Column("champion_feedback", JSONB, nullable=False),
    Column("results", JSONB, nullable=False),
    Column("reasons", JSONB, nullable=False),
    Column("metrics", JSONB, nullable=False),
    Index("checks_by_rollout", "rollout_id", "interval_index", unique=True),
)

timeline = Table(
    "timeline",
    metadata,
    Column("entry_id", BigInteger, Identity(), primary_key=True),
    Column("model_line", String(63)),
    Column("project_id", String(63)),
    Column("rollout_id", Uuid),
    Column("correlation_id", Uuid),
    Column("event_id", Uuid),
    Column("kind", String(64), nullable=False),
    Column("actor", Text, nullable=False),
    Column("summary", Text, nullable=False),
    Column("details", JSONB, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Index("timeline_by_line", "model_line", "at"),
    Index("timeline_by_correlation", "correlation_id"),
    Index("timeline_lineless", "project_id", postgresql_where=text("model_line IS NULL")),
)

line_controls = Table(
    "line_controls",
    metadata,
    Column("model_line", String(63), primary_key=True),
    Column("frozen", Boolean, nullable=False),
    Column("changed_by", Text),
    Column("changed_at", DateTime(timezone=True)),
    Column("reason", Text),
)

project_lines = Table(
    "project_lines",
    metadata,
    Column("project_id", String(63), primary_key=True),
    Column("model_line", String(63), primary_key=True),
    Column("learned_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)
"""Which lines a project feeds, learned from the events that name both."""
