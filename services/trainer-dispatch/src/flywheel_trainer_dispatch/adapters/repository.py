"""``RunStore`` on PostgreSQL: the runs table plus the runtime's outbox and idempotency claim.

Locks: admissions for one model line serialize on a transaction-level advisory lock, so two
triggers for a line never both see "nothing queued"; scheduling passes serialize on another
(taken with ``try``, so an instance never waits for another's pass), and take queued runs
``FOR UPDATE SKIP LOCKED``, so a run an admission is superseding, or an operator cancelling,
is simply not a candidate this time.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import RowMapping, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from flywheel_contracts import Event
from flywheel_runtime.db import Database
from flywheel_runtime.idempotency import claim
from flywheel_runtime.outbox import add_event
from flywheel_trainer_dispatch.adapters.tables import training_runs
from flywheel_trainer_dispatch.ports import (
    ACTIVE_STATES,
    RunFilter,
    RunState,
    TrainingRun,
)

_ACTIVE = [s.value for s in ACTIVE_STATES]
_READ_ONLY = ("run_id", "queue_position", "created_at", "updated_at")


class SqlTransaction:
    """One transaction on the service's schema."""

    def __init__(self, session: AsyncSession, consumer: str, lock_prefix: str) -> None:
        self._session = session
        self._consumer = consumer
        self._lock_prefix = lock_prefix

    async def claim(self, event_id: uuid.UUID) -> bool:
        return await claim(self._session, self._consumer, event_id)

    async def lock_line(self, model_line: str) -> None:
        await self._session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
            {"key": f"{self._lock_prefix}:line:{model_line}"},
        )

    async def try_lock_scheduler(self) -> bool:
        result = await self._session.execute(
            text("SELECT pg_try_advisory_xact_lock(hashtext(:key))"),
            {"key": f"{self._lock_prefix}:scheduler"},
        )
        return bool(result.scalar_one())

    async def run_by_trigger(self, trigger_event_id: uuid.UUID) -> TrainingRun | None:
        row = (
            await self._session.execute(
                select(training_runs).where(training_runs.c.trigger_event_id == trigger_event_id)
            )
        ).first()
        return None if row is None else _run(row._mapping)

    async def waiting_run(self, model_line: str) -> TrainingRun | None:
        row = (
            await self._session.execute(
                select(training_runs)
                .where(
                    training_runs.c.model_line == model_line,
                    training_runs.c.state == RunState.QUEUED.value,
                )
                .with_for_update()
            )
        ).first()
        return None if row is None else _run(row._mapping)

    async def waiting_runs(self) -> list[TrainingRun]:
        rows = await self._session.execute(
            select(training_runs)
            .where(training_runs.c.state == RunState.QUEUED.value)
            .order_by(training_runs.c.queue_position)
            .with_for_update(skip_locked=True)
        )
        return [_run(row._mapping) for row in rows]

    async def active_lines(self) -> list[str]:
        rows = await self._session.execute(
            select(training_runs.c.model_line).where(training_runs.c.state.in_(_ACTIVE))
        )
        return list(rows.scalars())

    async def lock_run(self, run_id: uuid.UUID) -> TrainingRun | None:
        row = (
            await self._session.execute(
                select(training_runs).where(training_runs.c.run_id == run_id).with_for_update()
            )
        ).first()
        return None if row is None else _run(row._mapping)

    async def add_run(self, run: TrainingRun) -> TrainingRun:
        values = _values(run)
        if run.queue_position is not None:
            values["queue_position"] = run.queue_position
        row = (
            await self._session.execute(
                insert(training_runs).values(run_id=run.run_id, **values).returning(training_runs)
            )
        ).one()
        return _run(row._mapping)

    async def save_run(self, run: TrainingRun) -> None:
        await self._session.execute(
            update(training_runs)
            .where(training_runs.c.run_id == run.run_id)
            .values(**_values(run), updated_at=func.now())
        )

    async def heartbeat(self, owner: str, at: datetime) -> None:
        await self._session.execute(
            update(training_runs)
            .where(training_runs.c.owner == owner, training_runs.c.state.in_(_ACTIVE))
            .values(heartbeat_at=at)
        )

    async def emit(self, event: Event[Any]) -> None:
        await add_event(self._session, event)


class SqlRunStore:
    """The runs in the service's PostgreSQL schema."""

    def __init__(self, db: Database, consumer: str) -> None:
        self._db = db
        self._consumer = consumer
        # Advisory locks are per database: the schema keeps two deployments sharing one apart.
        self._lock_prefix = f"{db.schema}.{consumer}"

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqlTransaction]:
        async with self._db.transaction() as session:
            yield SqlTransaction(session, self._consumer, self._lock_prefix)

    async def run(self, run_id: uuid.UUID) -> TrainingRun | None:
        async with self._db.transaction() as session:
            row = (
                await session.execute(select(training_runs).where(training_runs.c.run_id == run_id))
            ).first()
        return None if row is None else _run(row._mapping)

    async def runs(self, where: RunFilter) -> list[TrainingRun]:
        query = select(training_runs)
        if where.states:
            query = query.where(training_runs.c.state.in_(sorted(s.value for s in where.states)))
        if where.project_id is not None:
            query = query.where(training_runs.c.project_id == where.project_id)
        if where.model_line is not None:
            query = query.where(training_runs.c.model_line == where.model_line)
        query = query.order_by(
            training_runs.c.created_at.desc(), training_runs.c.queue_position.desc()
        ).limit(where.limit)
        async with self._db.transaction() as session:
            return [_run(row._mapping) for row in await session.execute(query)]

    async def active_runs(self, owner: str) -> list[TrainingRun]:
        async with self._db.transaction() as session:
            rows = await session.execute(
                select(training_runs)
                .where(training_runs.c.owner == owner, training_runs.c.state.in_(_ACTIVE))
                .order_by(training_runs.c.started_at, training_runs.c.queue_position)
            )
            return [_run(row._mapping) for row in rows]

    async def stale_runs(self, owner: str, silent_since: datetime) -> list[TrainingRun]:
        async with self._db.transaction() as session:
            rows = await session.execute(
                select(training_runs).where(
                    training_runs.c.state.in_(_ACTIVE),
                    training_runs.c.owner.is_distinct_from(owner),
                    func.coalesce(training_runs.c.heartbeat_at, training_runs.c.updated_at)
                    < silent_since,
                )
            )
            return [_run(row._mapping) for row in rows]


def _values(run: TrainingRun) -> dict[str, Any]:
    """A run as column values: JSON columns get JSON-ready data, the others Python objects."""
    plain = run.model_dump()
    as_json = run.model_dump(mode="json")
    values: dict[str, Any] = {}
    for column in training_runs.c:
        if column.name in _READ_ONLY or column.name not in plain:
            continue
        json_column = column.name in (
            "excluded_label_ids",
            "handle",
            "command",
            "metrics",
            "hyperparameters",
        )
        values[column.name] = (as_json if json_column else plain)[column.name]
    values["state"] = run.state.value
    values["priority"] = run.priority.value
    return values


def _run(row: RowMapping) -> TrainingRun:
    return TrainingRun.model_validate({c.name: row[c.name] for c in training_runs.c})
