"""Where inference logs live in S3 and the Arrow schema of their Parquet files.

Writer and reader share this module and nothing else, so the layout has one definition.
Partitions are hive-style (``key=value`` folders) so Spark, DuckDB and ``pyarrow.dataset`` can
prune them too; ``date`` and ``hour`` are the UTC hour of ``served_at``.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

import pyarrow as pa
import pyarrow.parquet as pq

from flywheel_contracts import InferenceLoggedV1

ROOT: Final = "inference"
"""Top folder of every inference log object in the bucket."""

CONTENT_TYPE: Final = "application/vnd.apache.parquet"

TIMESTAMP = pa.timestamp("us", tz="UTC")

SCHEMA: Final = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("correlation_id", pa.string(), nullable=False),
        pa.field("causation_id", pa.string()),
        pa.field("occurred_at", TIMESTAMP, nullable=False),
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("project_id", pa.string(), nullable=False),
        pa.field("model_line", pa.string(), nullable=False),
        pa.field("registered_model", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("input_sha256", pa.string(), nullable=False),
        pa.field("predicted_class", pa.string()),
        pa.field("confidence", pa.float64()),
        pa.field("latency_ms", pa.float64(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_code", pa.string()),
        pa.field("route", pa.string(), nullable=False),
        pa.field("served_at", TIMESTAMP, nullable=False),
        pa.field("serving_unavailable", pa.bool_()),
        pa.field("embedding", pa.list_(pa.float32())),
        pa.field("brightness", pa.float64()),
        pa.field("contrast", pa.float64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("input_key", pa.string()),
    ],
    metadata={"flywheel.event": InferenceLoggedV1.TYPE, "flywheel.version": "1"},
)
"""Columns of every file: the envelope's ids and time, then the payload's fields.

Fixed here rather than inferred per batch, so a batch without a single confidence still writes
a float column. New optional payload fields are appended as nullable columns; the reader fills
them with nulls for older files.
"""

ENVELOPE_COLUMNS: Final = ("event_id", "correlation_id", "causation_id", "occurred_at")


@dataclass(frozen=True, order=True)
class Partition:
    """One model line's logs of one UTC hour: one folder in the bucket."""

    model_line: str
    hour: datetime
    """Start of the hour, UTC."""

    @property
    def prefix(self) -> str:
        return hour_prefix(self.model_line, self.hour)

    def key(self, batch_id: str) -> str:
        """Object key of one batch's rows in this partition."""
        return f"{self.prefix}{batch_id}.parquet"


def as_utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a naive time is taken to be UTC already, as producers send it."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def floor_hour(moment: datetime) -> datetime:
    return as_utc(moment).replace(minute=0, second=0, microsecond=0)


def partition_of(event: InferenceLoggedV1) -> Partition:
    return Partition(event.payload.model_line, floor_hour(event.payload.served_at))


def line_prefix(model_line: str) -> str:
    return f"{ROOT}/model_line={model_line}/"


def date_prefix(model_line: str, day: date) -> str:
    return f"{line_prefix(model_line)}date={day:%Y-%m-%d}/"


def hour_prefix(model_line: str, hour: datetime) -> str:
    return f"{date_prefix(model_line, hour.date())}hour={hour:%H}/"


def parse_hour(key: str) -> datetime | None:
    """The partition hour named in an object key, or None for a key outside the layout."""
    fields = dict(part.split("=", 1) for part in key.split("/") if "=" in part)
    try:
        day = date.fromisoformat(fields["date"])
        hour = int(fields["hour"])
    except (KeyError, ValueError):
        return None
    if not 0 <= hour < 24:
        return None
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


def hours_between(since: datetime, until: datetime) -> Iterator[datetime]:
    """Start of every UTC hour that overlaps ``[since, until)``."""
    hour, end = floor_hour(since), as_utc(until)
    while hour < end:
        yield hour
        hour += timedelta(hours=1)


def batch_id(event_ids: Iterable[object]) -> str:
    """A name that depends only on which events a batch holds, never on their order."""
    digest = hashlib.sha256("\n".join(sorted({str(i) for i in event_ids})).encode())
    return digest.hexdigest()[:32]


def group(events: Iterable[InferenceLoggedV1]) -> dict[Partition, list[InferenceLoggedV1]]:
    """Events by partition, each event once (a publisher may have sent one twice)."""
    groups: dict[Partition, list[InferenceLoggedV1]] = {}
    seen: set[object] = set()
    for event in events:
        if event.event_id in seen:
            continue
        seen.add(event.event_id)
        groups.setdefault(partition_of(event), []).append(event)
    return dict(sorted(groups.items()))


def row(event: InferenceLoggedV1) -> dict[str, Any]:
    """One event as a row of ``SCHEMA``."""
    payload = event.payload.model_dump(mode="python")
    values: Mapping[str, Any] = {
        "event_id": str(event.event_id),
        "correlation_id": str(event.correlation_id),
        "causation_id": None if event.causation_id is None else str(event.causation_id),
        "occurred_at": as_utc(event.occurred_at),
        **payload,
        "request_id": str(payload["request_id"]),
        "served_at": as_utc(event.payload.served_at),
        # Image statistics are flattened: one column each, which query engines prune.
        **(payload.get("image_stats") or {}),
    }
    return {name: values.get(name) for name in SCHEMA.names}


def to_table(events: Sequence[InferenceLoggedV1]) -> pa.Table:
    return pa.Table.from_pylist([row(e) for e in events], schema=SCHEMA)


def encode(table: pa.Table) -> bytes:
    """Parquet bytes; zstd keeps hashes and ids, the bulk of a row, small."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def decode(data: bytes) -> pa.Table:
    """A stored file as a table of ``SCHEMA``, whichever schema version wrote it."""
    return conform(pq.read_table(pa.BufferReader(data)))


def conform(table: pa.Table) -> pa.Table:
    """Columns of ``SCHEMA`` in its order: missing ones null, unknown ones dropped."""
    columns = [
        table.column(field.name)
        if field.name in table.column_names
        else pa.nulls(table.num_rows, type=field.type)
        for field in SCHEMA
    ]
    return pa.Table.from_arrays(columns, names=SCHEMA.names).cast(SCHEMA)


def empty_table() -> pa.Table:
    return SCHEMA.empty_table()
