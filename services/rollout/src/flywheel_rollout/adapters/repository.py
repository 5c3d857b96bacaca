"""``Store`` on PostgreSQL: canaries, windows, checks, timeline, plus the runtime's outbox and
idempotency claim.

Locks: a decision locks its canary's row (``FOR UPDATE``); an inference log share-locks it while
it adds to the open interval, so a check never misses a log it should have judged. Both first
take a transaction-level advisory lock on the schema's canaries, exclusive for a decision and
shared for a log: PostgreSQL queues advisory locks in order, whereas a steady stream of logs
share-locking the row would keep a decision waiting for as long as the traffic lasts.
Admissions and starts of one line serialize on another advisory lock, and a partial unique
index allows one canary in progress per line whatever happens.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy import (
    ColumnElement,
    RowMapping,
    Table,
    delete,
    func,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB, distinct_on, insert
from sqlalchemy.ext.asyncio import AsyncSession

from flywheel_contracts import Event
from flywheel_rollout.adapters.tables import (
    canaries,
    checks,
    line_controls,
    project_lines,
    recent_predictions,
    timeline,
    windows,
)
from flywheel_rollout.analysis import Window
from flywheel_rollout.ports import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    Canary,
    CanaryFilter,
    CanaryState,
    Check,
    LineControl,
    TimelineEntry,
)
from flywheel_runtime.db import Database
from flywheel_runtime.idempotency import claim, processed_messages
from flywheel_runtime.outbox import add_event

M = TypeVar("M", bound=BaseModel)

_ACTIVE = [s.value for s in ACTIVE_STATES]
_TERMINAL = [s.value for s in TERMINAL_STATES]
_FEEDBACK_STATES = [CanaryState.RUNNING.value, CanaryState.PAUSED.value]
_WINDOW_COUNTS = (
    "requests",
    "errors",
    "outage_errors",
    "unavailable_errors",
    "latency_counts",
    "latency_sum_ms",
    "agreements",
    "disagreements",
    "prefilled",
    "corrected",
)


class SqlTransaction:
    """One transaction on the rollout's schema."""

    def __init__(
        self, session: AsyncSession, consumer: str, log_consumer: str, lock_prefix: str
    ) -> None:
        self._session = session
        self._consumer = consumer
        self._log_consumer = log_consumer
        self._lock_prefix = lock_prefix

    async def claim(self, event_id: uuid.UUID) -> bool:
        return await claim(self._session, self._consumer, event_id)

    async def claim_log(self, event_id: uuid.UUID) -> bool:
        return await claim(self._session, self._log_consumer, event_id)

    async def emit(self, event: Event[Any]) -> None:
        await add_event(self._session, event)

    async def lock_line(self, model_line: str) -> None:
        await self._session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
            {"key": f"{self._lock_prefix}:line:{model_line}"},
        )

    async def add_canary(self, canary: Canary) -> None:
        await self._session.execute(insert(canaries).values(_values(canaries, canary)))

    async def save_canary(self, canary: Canary) -> None:
        values = _values(canaries, canary)
        await self._session.execute(
            update(canaries)
            .where(canaries.c.rollout_id == canary.rollout_id)
            .values({**values, "updated_at": func.now()})
        )

    async def _lock_decisions(self, *, shared: bool = False) -> None:
        """The advisory lock that queues decisions and logs fairly (see the module's doc)."""
        function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
        await self._session.execute(
            text(f"SELECT {function}(hashtext(:key))"),
            {"key": f"{self._lock_prefix}:canaries"},
        )

    async def lock_canary(self, rollout_id: uuid.UUID) -> Canary | None:
        return await self._canary(canaries.c.rollout_id == rollout_id)

    async def active_canary(self, model_line: str) -> Canary | None:
        return await self._canary(
            canaries.c.model_line == model_line, canaries.c.state.in_(_ACTIVE)
        )

    async def waiting_canaries(self, model_line: str) -> list[Canary]:
        await self._lock_decisions()
        rows = await self._session.execute(
            select(canaries)
            .where(
                canaries.c.model_line == model_line,
                canaries.c.state == CanaryState.WAITING.value,
            )
            .order_by(canaries.c.created_at, canaries.c.rollout_id)
            .with_for_update()
        )
        return [_model(Canary, canaries, row._mapping) for row in rows]

    async def canary_by_event(self, validated_event_id: uuid.UUID) -> Canary | None:
        return await self._canary(canaries.c.validated_event_id == validated_event_id)

    async def open_interval(self, rollout_id: uuid.UUID) -> int | None:
        await self._lock_decisions(shared=True)
        row = (
            await self._session.execute(
                select(canaries.c.state, canaries.c.interval_index)
                .where(canaries.c.rollout_id == rollout_id)
                .with_for_update(read=True)
            )
        ).first()
        if row is None or row.state != CanaryState.RUNNING.value:
            return None
        return int(row.interval_index)

    async def window(self, rollout_id: uuid.UUID, interval: int, version: str) -> Window:
        # Create the row before locking it: two logs opening the same window at once would
        # otherwise both lock nothing, both start from zero, and the later upsert would erase
        # the earlier count. The second insert waits for the first to commit, then does nothing.
        empty = Window().model_dump(include=set(_WINDOW_COUNTS))
        await self._session.execute(
            insert(windows)
            .values(rollout_id=rollout_id, interval_index=interval, version=version, **empty)
            .on_conflict_do_nothing()
        )
        row = (
            await self._session.execute(
                select(windows)
                .where(
                    windows.c.rollout_id == rollout_id,
                    windows.c.interval_index == interval,
                    windows.c.version == version,
                )
                .with_for_update()
            )
        ).first()
        return Window() if row is None else _window(row._mapping)

    async def save_window(
        self, rollout_id: uuid.UUID, interval: int, version: str, window: Window
    ) -> None:
        counts = window.model_dump(include=set(_WINDOW_COUNTS))
        statement = insert(windows).values(
            rollout_id=rollout_id, interval_index=interval, version=version, **counts
        )
        await self._session.execute(
            statement.on_conflict_do_update(index_elements=list(windows.primary_key), set_=counts)
        )

    async def windows(self, rollout_id: uuid.UUID, interval: int) -> dict[str, Window]:
        rows = await self._session.execute(
            select(windows).where(
                windows.c.rollout_id == rollout_id, windows.c.interval_index == interval
            )
        )
        return {row.version: _window(row._mapping) for row in rows}

    async def feedback(self, rollout_id: uuid.UUID) -> dict[str, Window]:
        rows = await self._session.execute(
            select(windows).where(windows.c.rollout_id == rollout_id)
        )
        totals: dict[str, Window] = {}
        for row in rows:
            window = _window(row._mapping)
            totals[row.version] = (
                totals[row.version].merged(window) if row.version in totals else window
            )
        return totals

    async def recent_class(
        self, rollout_id: uuid.UUID, version: str, input_sha256: str
    ) -> str | None:
        result = await self._session.execute(
            select(recent_predictions.c.predicted_class).where(
                recent_predictions.c.rollout_id == rollout_id,
                recent_predictions.c.version == version,
                recent_predictions.c.input_sha256 == input_sha256,
            )
        )
        found = result.scalar_one_or_none()
        return None if found is None else str(found)

    async def remember(
        self,
        rollout_id: uuid.UUID,
        version: str,
        input_sha256: str,
        predicted_class: str,
        at: datetime,
    ) -> None:
        statement = insert(recent_predictions).values(
            rollout_id=rollout_id,
            version=version,
            input_sha256=input_sha256,
            predicted_class=predicted_class,
            seen_at=at,
        )
        await self._session.execute(
            statement.on_conflict_do_update(
                index_elements=list(recent_predictions.primary_key),
                set_={"predicted_class": predicted_class, "seen_at": at},
            )
        )

    async def forget(self, rollout_id: uuid.UUID) -> None:
        await self._session.execute(
            delete(recent_predictions).where(recent_predictions.c.rollout_id == rollout_id)
        )

    async def add_check(self, check: Check) -> None:
        await self._session.execute(insert(checks).values(_values(checks, check)))

    async def record(self, entry: TimelineEntry) -> None:
        values = _values(timeline, entry)
        values.pop("entry_id")
        await self._session.execute(insert(timeline).values(values))

    async def control(self, model_line: str) -> LineControl:
        row = (
            await self._session.execute(
                select(line_controls)
                .where(line_controls.c.model_line == model_line)
                .with_for_update()
            )
        ).first()
        if row is None:
            return LineControl(model_line=model_line)
        return _model(LineControl, line_controls, row._mapping)

    async def save_control(self, control: LineControl) -> None:
        values = _values(line_controls, control)
        statement = insert(line_controls).values(values)
        await self._session.execute(
            statement.on_conflict_do_update(
                index_elements=[line_controls.c.model_line], set_=values
            )
        )

    async def learn_line(self, project_id: str, model_line: str) -> None:
        learned = (
            await self._session.execute(
                insert(project_lines)
                .values(project_id=project_id, model_line=model_line)
                .on_conflict_do_nothing()
                .returning(project_lines.c.project_id)
            )
        ).first()
        if learned is not None:
            await self._session.execute(
                update(timeline)
                .where(timeline.c.model_line.is_(None), timeline.c.project_id == project_id)
                .values(model_line=model_line)
            )

    async def lines_of(self, project_id: str) -> list[str]:
        rows = await self._session.execute(
            select(project_lines.c.model_line)
            .where(project_lines.c.project_id == project_id)
            .order_by(project_lines.c.model_line)
        )
        return [str(line) for line in rows.scalars()]

    async def project_canaries(self, project_id: str) -> list[Canary]:
        rows = await self._session.execute(
            select(canaries).where(
                canaries.c.project_id == project_id, canaries.c.state.in_(_FEEDBACK_STATES)
            )
        )
        return [_model(Canary, canaries, row._mapping) for row in rows]

    async def _canary(self, *conditions: ColumnElement[bool]) -> Canary | None:
        await self._lock_decisions()
        row = (
            await self._session.execute(select(canaries).where(*conditions).with_for_update())
        ).first()
        return None if row is None else _model(Canary, canaries, row._mapping)


class SqlStore:
    """The rollout's state in its PostgreSQL schema."""

    def __init__(self, db: Database, consumer: str) -> None:
        self._db = db
        self._consumer = consumer
        self._log_consumer = f"{consumer}.inference"
        # Advisory locks are per database: the schema keeps two deployments sharing one apart.
        self._lock_prefix = f"{db.schema}.{consumer}"

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqlTransaction]:
        async with self._db.transaction() as session:
            yield SqlTransaction(session, self._consumer, self._log_consumer, self._lock_prefix)

    async def canary(self, rollout_id: uuid.UUID) -> Canary | None:
        found = await self._select(select(canaries).where(canaries.c.rollout_id == rollout_id))
        return _model(Canary, canaries, found[0]) if found else None

    async def current(self, model_line: str) -> Canary | None:
        found = await self._select(
            select(canaries).where(
                canaries.c.model_line == model_line, canaries.c.state.in_(_ACTIVE)
            )
        )
        return _model(Canary, canaries, found[0]) if found else None

    async def canaries(self, where: CanaryFilter) -> list[Canary]:
        query = select(canaries)
        if where.model_line is not None:
            query = query.where(canaries.c.model_line == where.model_line)
        if where.states:
            query = query.where(canaries.c.state.in_([s.value for s in where.states]))
        query = query.order_by(canaries.c.created_at.desc(), canaries.c.rollout_id).limit(
            where.limit
        )
        return [_model(Canary, canaries, row) for row in await self._select(query)]

    async def checks(self, rollout_id: uuid.UUID) -> list[Check]:
        query = (
            select(checks)
            .where(checks.c.rollout_id == rollout_id)
            .order_by(checks.c.interval_index)
        )
        return [_model(Check, checks, row) for row in await self._select(query)]

    async def timeline(
        self, model_line: str, correlation_id: uuid.UUID | None, limit: int
    ) -> list[TimelineEntry]:
        query = select(timeline).where(timeline.c.model_line == model_line)
        if correlation_id is not None:
            query = query.where(timeline.c.correlation_id == correlation_id)
        query = query.order_by(timeline.c.at.desc(), timeline.c.entry_id.desc()).limit(limit)
        rows = await self._select(query)
        return [_model(TimelineEntry, timeline, row) for row in reversed(rows)]

    async def line_control(self, model_line: str) -> LineControl:
        found = await self._select(
            select(line_controls).where(line_controls.c.model_line == model_line)
        )
        return (
            _model(LineControl, line_controls, found[0])
            if found
            else LineControl(model_line=model_line)
        )

    async def frozen_lines(self) -> set[str]:
        rows = await self._select(select(line_controls).where(line_controls.c.frozen.is_(True)))
        return {str(row["model_line"]) for row in rows}

    async def unfinalized(self) -> list[Canary]:
        query = (
            select(canaries)
            .where(canaries.c.finalized_at.is_(None), canaries.c.state.in_(_TERMINAL))
            .order_by(canaries.c.finished_at)
        )
        return [_model(Canary, canaries, row) for row in await self._select(query)]

    async def latest_steps(self) -> list[Canary]:
        query = (
            select(canaries)
            .where(canaries.c.last_step.is_not(None))
            .ext(distinct_on(canaries.c.model_line))
            .order_by(
                canaries.c.model_line,
                canaries.c.started_at.desc().nulls_last(),
                canaries.c.created_at.desc(),
            )
        )
        return [_model(Canary, canaries, row) for row in await self._select(query)]

    async def prune(self, *, keep_recent: int, log_claims_before: datetime) -> None:
        ranked = select(
            recent_predictions.c.rollout_id,
            recent_predictions.c.version,
            recent_predictions.c.input_sha256,
            func.row_number()
            .over(
                partition_by=(recent_predictions.c.rollout_id, recent_predictions.c.version),
                order_by=recent_predictions.c.seen_at.desc(),
            )
            .label("rank"),
        ).subquery()
        old = select(ranked.c.rollout_id, ranked.c.version, ranked.c.input_sha256).where(
            ranked.c.rank > keep_recent
        )
        async with self._db.transaction() as session:
            await session.execute(
                delete(recent_predictions).where(
                    tuple_(
                        recent_predictions.c.rollout_id,
                        recent_predictions.c.version,
                        recent_predictions.c.input_sha256,
                    ).in_(old)
                )
            )
            await session.execute(
                delete(processed_messages).where(
                    processed_messages.c.consumer == self._log_consumer,
                    processed_messages.c.processed_at < log_claims_before,
                )
            )

    async def _select(self, query: Any) -> list[RowMapping]:
        async with self._db.transaction() as session:
            return [row._mapping for row in await session.execute(query)]


def _values(table: Table, record: BaseModel) -> dict[str, Any]:
    """The record as column values: JSON columns get JSON-ready data, the others Python objects."""
    plain = record.model_dump()
    as_json = record.model_dump(mode="json")
    return {
        column.name: (as_json if isinstance(column.type, JSONB) else plain)[column.name]
        for column in table.c
        if column.name in plain
    }


def _model(model: type[M], table: Table, row: RowMapping) -> M:
    return model.model_validate(
        {column.name: row[column.name] for column in table.c if column.name in model.model_fields}
    )


def _window(row: RowMapping) -> Window:
    return Window.model_validate({name: row[name] for name in _WINDOW_COUNTS})
