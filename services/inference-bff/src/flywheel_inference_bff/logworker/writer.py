"""Writes one batch of inference logs: one Parquet file per partition, all or raise."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from flywheel_contracts import InferenceLoggedV1
from flywheel_inference_bff.logworker.layout import CONTENT_TYPE, batch_id, encode, group, to_table


class ObjectSink(Protocol):
    """The storage calls the writer needs; ``ObjectStorage`` is the real one."""

    async def ensure_buckets(self, *names: str) -> None: ...

    async def put(
        self,
        bucket: str,
        key: str,
        data: bytes,
        *,
        content_type: str = ...,
        metadata: Mapping[str, str] | None = ...,
    ) -> Any: ...


@dataclass(frozen=True)
class WrittenBatch:
    """What one successful write stored."""

    batch_id: str
    keys: list[str]
    rows: int


class ParquetBatchWriter:
    """Groups a batch by partition and writes every group under the batch's id."""

    def __init__(self, storage: ObjectSink, bucket: str) -> None:
        self._storage = storage
        self._bucket = bucket
        self._bucket_ready = False

    async def write(self, events: Sequence[InferenceLoggedV1]) -> WrittenBatch:
        """Store every event, or raise; a repeated call with the same events stores the same keys.

        Every group's write is awaited even when one fails, so nothing of an attempt is still
        in flight when the caller retries.
        """
        if not self._bucket_ready:
            # Here rather than at start-up, so the worker starts (and serves its health
            # routes) while S3 is down; the first write creates the bucket.
            await self._storage.ensure_buckets(self._bucket)
            self._bucket_ready = True
        name = batch_id(e.event_id for e in events)
        groups = group(events)
        files = await asyncio.to_thread(
            lambda: {part.key(name): encode(to_table(rows)) for part, rows in groups.items()}
        )
        results = await asyncio.gather(
            *(
                self._storage.put(
                    self._bucket,
                    key,
                    data,
                    content_type=CONTENT_TYPE,
                    metadata={"batch-id": name},
                )
                for key, data in files.items()
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return WrittenBatch(name, list(files), sum(len(rows) for rows in groups.values()))
