"""The data monitor's tables, in its own schema (the runtime adds outbox and processed_messages)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

projects = Table(
    "projects",
    metadata,
    Column("project_id", String(63), primary_key=True),
    Column("config_revision", Integer, nullable=False, server_default="0"),
    Column("model_line", String(63)),
    Column("task_type", String(32)),
    Column("class_names", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("policy", JSONB),
    Column("head_snapshot_id", Text),
    Column("head_sequence", BigInteger),
    Column("trained_snapshot_id", Text),
    Column("trained_sequence", BigInteger),
    Column("trained_class_counts", JSONB),
    Column("last_fired_at", DateTime(timezone=True)),
    Column("pending_labels", Integer, nullable=False, server_default="0"),
    Column("pending_prefilled", Integer, nullable=False, server_default="0"),
    Column("pending_corrected", Integer, nullable=False, server_default="0"),
    Column("oldest_pending_at", DateTime(timezone=True)),
    Column("last_batch_event_id", Uuid),
    Column("last_batch_correlation_id", Uuid),
    Column("class_counts", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("last_evaluation", JSONB),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("projects_pending", "project_id", postgresql_where=text("pending_labels > 0")),
)

decisions = Table(
    "decisions",
    metadata,
    Column("decision_id", Uuid, primary_key=True),
    Column("project_id", String(63), ForeignKey("projects.project_id"), nullable=False),
    Column("model_line", String(63), nullable=False),
    Column("snapshot_id", Text, nullable=False),
    Column("reason", String(32), nullable=False),
    Column("trigger", String(32), nullable=False),
    Column("decided_at", DateTime(timezone=True), nullable=False),
    Column("caused_by", Uuid),
    Column("threshold_event_id", Uuid, nullable=False),
    Column("labels_since_last", Integer, nullable=False),
    Column("effective_threshold", Integer, nullable=False),
    Column("excluded_label_count", Integer, nullable=False),
    Column("evaluation", JSONB, nullable=False),
    Index("decisions_by_project", "project_id", "decided_at"),
)

quality_reports = Table(
    "quality_reports",
    metadata,
    Column("report_id", Uuid, primary_key=True),
    Column("project_id", String(63), ForeignKey("projects.project_id"), nullable=False),
    Column("batch_id", Uuid, nullable=False),
    Column("event_id", Uuid, nullable=False),
    Column("snapshot_id", Text, nullable=False),
    Column("snapshot_sequence", BigInteger),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("label_count", Integer, nullable=False),
    Column("passed", Boolean, nullable=False),
    Column("quarantined", Boolean, nullable=False),
    Column("counted", Boolean, nullable=False),
    Column("reference_source", String(32), nullable=False),
    Column("checks", JSONB, nullable=False),
    Column("reasons", JSONB, nullable=False),
    UniqueConstraint("project_id", "batch_id", name="quality_reports_one_per_batch"),
    Index("quality_reports_by_project", "project_id", "created_at"),
)

quarantined_labels = Table(
    "quarantined_labels",
    metadata,
    Column("project_id", String(63), ForeignKey("projects.project_id"), primary_key=True),
    Column("label_id", Uuid, primary_key=True),
    Column("batch_id", Uuid, nullable=False),
    Column("report_id", Uuid, ForeignKey("quality_reports.report_id"), nullable=False),
    Column("quarantined_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)


drift_samples = Table(
    "drift_samples",
    metadata,
    Column("request_id", Uuid, primary_key=True),
    Column("project_id", String(63), nullable=False),
    Column("model_line", String(63), nullable=False),
    Column("model_version", Text, nullable=False),
    Column("served_at", DateTime(timezone=True), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("embedding", LargeBinary),
    Column("brightness", Float),
    Column("contrast", Float),
    Column("width", Integer),
    Column("height", Integer),
    Column("predicted_class", Text),
    Column("confidence", Float),
    Column("input_sha256", String(64), nullable=False),
    Column("input_key", Text),
    Index("drift_samples_by_line", "model_line", "served_at"),
    Index("drift_samples_by_arrival", "model_line", "received_at"),
)
"""Drift features of recent inferences; embeddings as little-endian float32 bytes."""

drift_lines = Table(
    "drift_lines",
    metadata,
    Column("model_line", String(63), primary_key=True),
    Column("project_id", String(63), nullable=False),
    Column("last_checked_at", DateTime(timezone=True)),
    Column("last_report_id", Uuid),
    Column("last_action", String(32)),
    Column("last_action_at", DateTime(timezone=True)),
    Column("last_action_version", Text),
)

drift_reports = Table(
    "drift_reports",
    metadata,
    Column("report_id", Uuid, primary_key=True),
    Column("project_id", String(63), nullable=False),
    Column("model_line", String(63), nullable=False),
    Column("model_version", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("drifted", Boolean, nullable=False),
    Column("action", String(32)),
    Column("note", Text),
    Column("event_id", Uuid),
    Column("report", JSONB, nullable=False),
    Column("plots", JSONB, nullable=False),
    Index("drift_reports_by_project", "project_id", "created_at"),
)
