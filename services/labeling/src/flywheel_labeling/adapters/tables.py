"""The labeling tables, in the service's own schema (the runtime adds outbox and
processed_messages)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

projects = Table(
    "projects",
    metadata,
    Column("project_id", String(63), primary_key=True),
    Column("name", Text, nullable=False),
    Column("task_type", String(32), nullable=False),
    Column("class_names", JSONB, nullable=False),
    Column("model_line", String(63), nullable=False),
    Column("policy", JSONB, nullable=False),
    Column("revision", Integer, nullable=False),
    Column("head_snapshot_id", Text),
    Column("head_sequence", BigInteger, nullable=False, server_default="0"),
    Column("label_count", BigInteger, nullable=False, server_default="0"),
    Column("class_counts", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


def _label_content() -> tuple[Column[object], ...]:
    """What a label says; the same columns in ``labels`` and ``label_history``."""
    return (
        Column("class_name", Text, nullable=False),
        Column("source", String(16), nullable=False),
        Column("prediction_id", Text),
        Column("model_version", Text),
        Column("predicted_class", Text),
        Column("confidence", Float),
        Column("corrected", Boolean, nullable=False),
    )


labels = Table(
    "labels",
    metadata,
    Column("label_id", Uuid, primary_key=True),
    # Listing order: assigned once at creation, kept by every revision (keyset pagination).
    Column("position", BigInteger, Identity(), nullable=False, unique=True),
    Column("project_id", String(63), ForeignKey("projects.project_id"), nullable=False),
    Column("image_sha256", String(64), nullable=False),
    Column("image_key", Text, nullable=False),
    Column("split", String(16), nullable=False),
    *_label_content(),
    Column("labeler", Text),
    Column("revision", Integer, nullable=False),
    Column("external_id", Text),
    Column("snapshot_id", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("project_id", "image_sha256", name="labels_one_per_image"),
    Index("labels_by_project", "project_id", "position"),
)

label_history = Table(
    "label_history",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("label_id", Uuid, nullable=False),
    Column("project_id", String(63), nullable=False),
    Column("image_sha256", String(64), nullable=False),
    Column("image_key", Text, nullable=False),
    Column("split", String(16), nullable=False),
    *_label_content(),
    Column("labeler", Text),
    Column("revision", Integer, nullable=False),
    Column("external_id", Text),
    Column("snapshot_id", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("reason", String(16), nullable=False),
    Column("superseded_in", Text, nullable=False),
    Column("superseded_at", DateTime(timezone=True), nullable=False),
    Index("label_history_by_label", "label_id", "revision"),
)

snapshots = Table(
    "snapshots",
    metadata,
    Column("snapshot_id", Text, primary_key=True),
    Column("project_id", String(63), ForeignKey("projects.project_id"), nullable=False),
    Column("parent_snapshot_id", Text),
    Column("sequence", BigInteger, nullable=False),
    Column("label_count", BigInteger, nullable=False),
    Column("class_counts", JSONB, nullable=False),
    Column("batch_id", Uuid, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("upserted", Integer, nullable=False),
    Column("deleted", Integer, nullable=False),
    UniqueConstraint("project_id", "sequence", name="snapshots_sequence"),
)

label_studio_annotations = Table(
    "label_studio_annotations",
    metadata,
    Column("project_id", String(63), primary_key=True),
    Column("annotation_id", BigInteger, primary_key=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("label_id", Uuid),
    Column("image_sha256", String(64)),
    Column("deleted", Boolean, nullable=False, server_default="false"),
)

label_requests = Table(
    "label_requests",
    metadata,
    Column("entry_id", BigInteger, Identity(), primary_key=True),
    # No foreign key: a request may name a project before it is created here.
    Column("project_id", String(63), nullable=False),
    Column("request_id", Uuid, nullable=False),
    Column("report_id", Uuid),
    Column("reason", String(32), nullable=False),
    Column("input_sha256", String(64), nullable=False),
    Column("image_key", Text, nullable=False),
    Column("score", Float, nullable=False),
    Column("predicted_class", Text),
    Column("confidence", Float),
    Column("status", String(16), nullable=False),
    Column("requested_at", DateTime(timezone=True), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("labeled_label_id", Uuid),
    CheckConstraint("status IN ('open', 'labeled', 'dismissed')", name="label_requests_status"),
    # One open entry per image and project: a new request merges into it.
    Index(
        "label_requests_one_open",
        "project_id",
        "input_sha256",
        unique=True,
        postgresql_where=text("status = 'open'"),
    ),
    Index("label_requests_by_image", "project_id", "input_sha256"),
)
# The queue's order: score down, then oldest first (keyset pagination).
Index(
    "label_requests_queue",
    label_requests.c.project_id,
    label_requests.c.status,
    label_requests.c.score.desc(),
    label_requests.c.created_at,
    label_requests.c.entry_id,
)
