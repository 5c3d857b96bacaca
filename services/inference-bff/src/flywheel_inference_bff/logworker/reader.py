"""Reads inference logs back from S3: one model line, a time range, each event once.

Only the ``date=`` folders the range touches are listed, and only files whose ``hour=`` lies
in it are downloaded. Rows are deduplicated by ``event_id``: a batch the broker redelivered in
a different composition lands in a second file, and this is where the copy disappears.

It depends on nothing but the shared libraries and ``layout``, so the data monitor can use it
for drift once both modules move into a shared library.
"""

from __future__ import annotations

import asyncio
import functools
from datetime import datetime
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc

from flywheel_inference_bff.logworker.layout import (
    SCHEMA,
    TIMESTAMP,
    as_utc,
    date_prefix,
    decode,
    empty_table,
    hours_between,
    parse_hour,
)


class LogObjects(Protocol):
    """Storage calls the reader needs; ``ObjectStorage`` is the real one."""

    async def list_keys(self, bucket: str, prefix: str) -> list[str]: ...

    async def get(self, bucket: str, key: str) -> bytes: ...


async def read_inference_logs(
    storage: LogObjects,
    bucket: str,
    *,
    model_line: str,
    since: datetime,
    until: datetime,
    concurrency: int = 16,
) -> pa.Table:
    """Rows of ``SCHEMA`` served in ``[since, until)``, one per event, oldest first.

    Naive times are taken as UTC, as the writer does.
    """
    since, until = as_utc(since), as_utc(until)
    hours = set(hours_between(since, until))
    if not hours:
        return empty_table()
    days = sorted({hour.date() for hour in hours})
    listed = await asyncio.gather(
        *(storage.list_keys(bucket, date_prefix(model_line, day)) for day in days)
    )
    keys = sorted(
        key
        for day_keys in listed
        for key in day_keys
        if key.endswith(".parquet") and parse_hour(key) in hours
    )
    if not keys:
        return empty_table()
    limit = asyncio.Semaphore(concurrency)

    async def fetch(key: str) -> bytes:
        async with limit:
            return await storage.get(bucket, key)

    blobs = await asyncio.gather(*(fetch(key) for key in keys))
    return await asyncio.to_thread(functools.partial(_assemble, blobs, since, until))


def _assemble(blobs: list[bytes], since: datetime, until: datetime) -> pa.Table:
    table = pa.concat_tables([decode(blob) for blob in blobs])
    served = table.column("served_at")
    in_range = pc.and_(
        pc.greater_equal(served, pa.scalar(since, type=TIMESTAMP)),
        pc.less(served, pa.scalar(until, type=TIMESTAMP)),
    )
    return _first_per_event(table.filter(in_range)).sort_by(
        [("served_at", "ascending"), ("event_id", "ascending")]
    )


def _first_per_event(table: pa.Table) -> pa.Table:
    """Keep each event_id's first row; copies of one event hold the same values."""
    if table.num_rows == 0:
        return table.cast(SCHEMA)
    numbered = table.append_column("_row", pa.array(range(table.num_rows), type=pa.int64()))
    first = numbered.group_by("event_id", use_threads=False).aggregate([("_row", "min")])
    return table.take(first.column("_row_min"))
