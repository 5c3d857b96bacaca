"""The validator's tables, in its own schema (the runtime adds outbox and processed_messages)."""

from __future__ import annotations

from sqlalchemy import Column, DateTime, Float, Index, Integer, MetaData, String, Table, Text, Uuid
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

validations = Table(
    "validations",
    metadata,
    Column("validation_id", Uuid, primary_key=True),
    Column("event_id", Uuid, nullable=False, unique=True),
    Column("correlation_id", Uuid, nullable=False),
    Column("validated_event_id", Uuid, nullable=False),
    Column("project_id", String(63), nullable=False),
    Column("model_line", String(63), nullable=False),
    Column("registered_model", Text, nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("champion_version", String(64)),
    Column("snapshot_id", Text, nullable=False),
    Column("verdict", String(16), nullable=False),
    Column("test_images", Integer, nullable=False),
    Column("candidate_metrics", JSONB, nullable=False),
    Column("champion_metrics", JSONB, nullable=False),
    Column("reasons", JSONB, nullable=False),
    Column("gates", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("duration_s", Float, nullable=False),
    Index("validations_by_model_line", "model_line", "created_at"),
    Index("validations_by_version", "registered_model", "model_version"),
)
