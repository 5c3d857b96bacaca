"""``DriftStore`` on PostgreSQL, and the drift references and plots in S3.

The drift transaction is the monitor's ``SqlTransaction`` with the drift tables added, so a
drift retrain (``threshold.reached``), its ``drift.detected`` and the stored report commit
together.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

import numpy as np
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert

from flywheel_data_monitor.adapters.repository import SqlStore, SqlTransaction
from flywheel_data_monitor.adapters.tables import drift_lines, drift_reports, drift_samples
from flywheel_data_monitor.drift import DriftReport, Features
from flywheel_data_monitor.ports import DriftLine, DriftSample, StoredDriftReport
from flywheel_runtime.drift_reference import decode_reference, reference_key
from flywheel_runtime.errors import NotFoundError
from flywheel_runtime.storage import ObjectStorage

_FLOAT32 = np.dtype("<f4")


class SqlDriftTransaction(SqlTransaction):
    """The monitor's transaction plus the drift tables."""

    async def lock_drift_line(self, model_line: str, project_id: str) -> DriftLine:
        await self._session.execute(
            insert(drift_lines)
            .values(model_line=model_line, project_id=project_id)
            .on_conflict_do_nothing()
        )
        row = (
            await self._session.execute(
                select(drift_lines).where(drift_lines.c.model_line == model_line).with_for_update()
            )
        ).one()
        return DriftLine.model_validate(dict(row._mapping))

    async def save_drift_line(self, line: DriftLine) -> None:
        values = line.model_dump()
        values.pop("model_line")
        await self._session.execute(
            update(drift_lines).where(drift_lines.c.model_line == line.model_line).values(**values)
        )

    async def add_drift_report(self, stored: StoredDriftReport) -> None:
        report = stored.report
        await self._session.execute(
            insert(drift_reports).values(
                report_id=report.report_id,
                project_id=report.project_id,
                model_line=report.model_line,
                model_version=report.model_version,
                created_at=stored.created_at,
                drifted=stored.drifted,
                action=stored.action,
                note=stored.note,
                event_id=stored.event_id,
                report=report.model_dump(mode="json"),
                plots=stored.plots,
            )
        )


class SqlDriftStore(SqlStore):
    """The monitor's store plus drift samples and reports."""

    @asynccontextmanager
    async def drift_transaction(self) -> AsyncIterator[SqlDriftTransaction]:
        async with self._db.transaction() as session:
            yield SqlDriftTransaction(session, self._consumer)

    async def add_drift_samples(self, samples: list[DriftSample]) -> int:
        if not samples:
            return 0
        rows = [
            sample.model_dump(exclude={"embedding"}) | {"embedding": _pack(sample.embedding)}
            for sample in samples
        ]
        async with self._db.transaction() as session:
            result = await session.execute(
                insert(drift_samples)
                .values(rows)
                .on_conflict_do_nothing(index_elements=["request_id"])
                .returning(drift_samples.c.request_id)
            )
            return len(result.all())

    async def drift_lines_due(
        self, now: datetime, *, interval_s: float, every_samples: int
    ) -> list[tuple[str, str]]:
        async with self._db.transaction() as session:
            # New samples per line since its last check (all of them for a line never checked),
            # and since when: the last check, or the first sample of a new line.
            arrivals = (
                select(
                    drift_samples.c.model_line,
                    func.max(drift_samples.c.project_id).label("project_id"),
                    func.count().label("new"),
                    func.coalesce(
                        func.max(drift_lines.c.last_checked_at),
                        func.min(drift_samples.c.received_at),
                    ).label("since"),
                )
                .select_from(
                    drift_samples.outerjoin(
                        drift_lines, drift_lines.c.model_line == drift_samples.c.model_line
                    )
                )
                .where(
                    (drift_lines.c.last_checked_at.is_(None))
                    | (drift_samples.c.received_at > drift_lines.c.last_checked_at)
                )
                .group_by(drift_samples.c.model_line)
                .subquery()
            )
            rows = await session.execute(
                select(arrivals.c.model_line, arrivals.c.project_id)
                .where(
                    (arrivals.c.since <= now - timedelta(seconds=interval_s))
                    | (arrivals.c.new >= every_samples)
                )
                .order_by(arrivals.c.model_line)
            )
            return [(row.model_line, row.project_id) for row in rows]

    async def drift_window(
        self, model_line: str, start: datetime, end: datetime, limit: int
    ) -> list[DriftSample]:
        async with self._db.transaction() as session:
            rows = await session.execute(
                select(drift_samples)
                .where(
                    drift_samples.c.model_line == model_line,
                    drift_samples.c.served_at >= start,
                    drift_samples.c.served_at < end,
                )
                .order_by(drift_samples.c.served_at.desc(), drift_samples.c.request_id)
                .limit(limit)
            )
            newest_first = [
                DriftSample.model_validate(
                    dict(row._mapping) | {"embedding": _unpack(row.embedding)}
                )
                for row in rows
            ]
        return newest_first[::-1]

    async def prune_drift_samples(self, before: datetime) -> int:
        async with self._db.transaction() as session:
            result = await session.execute(
                delete(drift_samples)
                .where(drift_samples.c.served_at < before)
                .returning(drift_samples.c.request_id)
            )
            return len(result.all())

    async def drift_reports(self, project_id: str, limit: int) -> list[StoredDriftReport]:
        async with self._db.transaction() as session:
            rows = await session.execute(
                select(drift_reports)
                .where(drift_reports.c.project_id == project_id)
                .order_by(drift_reports.c.created_at.desc(), drift_reports.c.report_id)
                .limit(limit)
            )
            return [_stored(row._mapping) for row in rows]

    async def drift_report(self, report_id: uuid.UUID) -> StoredDriftReport | None:
        async with self._db.transaction() as session:
            row = (
                await session.execute(
                    select(drift_reports).where(drift_reports.c.report_id == report_id)
                )
            ).first()
        return None if row is None else _stored(row._mapping)


def _stored(row: object) -> StoredDriftReport:
    mapping = dict(row)  # type: ignore[call-overload]
    return StoredDriftReport(
        report=DriftReport.model_validate(mapping["report"]),
        drifted=mapping["drifted"],
        action=mapping["action"],
        note=mapping["note"],
        plots=mapping["plots"],
        event_id=mapping["event_id"],
        created_at=mapping["created_at"],
    )


def _pack(embedding: Sequence[float] | None) -> bytes | None:
    return None if embedding is None else np.asarray(embedding, dtype=_FLOAT32).tobytes()


def _unpack(data: bytes | None) -> list[float] | None:
    return None if data is None else np.frombuffer(data, dtype=_FLOAT32).astype(float).tolist()


# --- S3 -----------------------------------------------------------------------------------------


class S3References:
    """References under ``<prefix>/<model line>/<version>.npz`` in the data bucket."""

    def __init__(self, storage: ObjectStorage, bucket: str, prefix: str) -> None:
        self._storage = storage
        self._bucket = bucket
        self._prefix = prefix

    async def load(self, model_line: str, version: str) -> Features | None:
        try:
            data = await self._storage.get(
                self._bucket, reference_key(self._prefix, model_line, version)
            )
        except NotFoundError:
            return None
        reference = decode_reference(data)
        return Features(
            embeddings=reference.embeddings,
            statistics=reference.statistics,
            predicted=reference.predicted,
        )


class S3ReportArtifacts:
    """Plots under ``<prefix>/<report id>/<feature>.png`` in the data bucket."""

    def __init__(self, storage: ObjectStorage, bucket: str, prefix: str) -> None:
        self._storage = storage
        self._bucket = bucket
        self._prefix = prefix.rstrip("/")

    async def put_plot(self, report_id: uuid.UUID, feature: str, png: bytes) -> str:
        key = f"{self._prefix}/{report_id}/{feature}.png"
        await self._storage.put(self._bucket, key, png, content_type="image/png")
        return key

    async def get_plot(self, key: str) -> bytes:
        return await self._storage.get(self._bucket, key)
