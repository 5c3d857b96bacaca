"""``Store`` on PostgreSQL: the monitor's tables plus the runtime's outbox and idempotency claim."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from pydantic import BaseModel
from sqlalchemy import RowMapping, Table, func, select, update
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncSession

from flywheel_contracts import Event
from flywheel_data_monitor.adapters.tables import (
    decisions,
    projects,
    quality_reports,
    quarantined_labels,
)
from flywheel_data_monitor.policy import Evaluation
from flywheel_data_monitor.ports import Decision, ProjectState, QualityReport
from flywheel_runtime.db import Database
from flywheel_runtime.idempotency import claim
from flywheel_runtime.outbox import add_event

_STATE_COLUMNS = tuple(c.name for c in projects.c if c.name not in ("created_at", "updated_at"))


class SqlTransaction:
    """One transaction on the monitor's schema."""

    def __init__(self, session: AsyncSession, consumer: str) -> None:
        self._session = session
        self._consumer = consumer

    async def claim(self, event_id: uuid.UUID) -> bool:
        return await claim(self._session, self._consumer, event_id)

    async def lock_project(self, project_id: str) -> ProjectState:
        # Create-if-missing first, so that the lock below always has a row to take; a racing
        # creator makes this a no-op once it commits.
        await self._session.execute(
            insert(projects).values(project_id=project_id).on_conflict_do_nothing()
        )
        row = (
            await self._session.execute(
                select(projects).where(projects.c.project_id == project_id).with_for_update()
            )
        ).one()
        return _state(row._mapping)

    async def try_lock_project(self, project_id: str) -> ProjectState | None:
        row = (
            await self._session.execute(
                select(projects)
                .where(projects.c.project_id == project_id)
                .with_for_update(skip_locked=True)
            )
        ).first()
        return None if row is None else _state(row._mapping)

    async def save_project(self, state: ProjectState) -> None:
        values = _values(state, projects)
        values.pop("project_id")
        await self._session.execute(
            update(projects)
            .where(projects.c.project_id == state.project_id)
            .values(**values, updated_at=func.now())
        )

    async def batch_seen(self, project_id: str, batch_id: uuid.UUID) -> bool:
        row = (
            await self._session.execute(
                select(quality_reports.c.report_id).where(
                    quality_reports.c.project_id == project_id,
                    quality_reports.c.batch_id == batch_id,
                )
            )
        ).first()
        return row is not None

    async def add_report(self, report: QualityReport) -> None:
        await self._session.execute(
            insert(quality_reports).values(_values(report, quality_reports))
        )

    async def quarantine(
        self, project_id: str, label_ids: list[uuid.UUID], report: QualityReport
    ) -> None:
        if not label_ids:
            return
        await self._session.execute(
            insert(quarantined_labels)
            .values(
                [
                    {
                        "project_id": project_id,
                        "label_id": label_id,
                        "batch_id": report.batch_id,
                        "report_id": report.report_id,
                    }
                    for label_id in label_ids
                ]
            )
            .on_conflict_do_nothing()
        )

    async def quarantined_label_ids(self, project_id: str) -> list[uuid.UUID]:
        rows = await self._session.execute(
            select(quarantined_labels.c.label_id)
            .where(quarantined_labels.c.project_id == project_id)
            .order_by(quarantined_labels.c.label_id)
        )
        return list(rows.scalars())

    async def add_decision(self, decision: Decision) -> None:
        await self._session.execute(
            insert(decisions).values(
                decision_id=decision.decision_id,
                project_id=decision.project_id,
                model_line=decision.model_line,
                snapshot_id=decision.snapshot_id,
                reason=decision.reason.value,
                trigger=decision.trigger,
                decided_at=decision.decided_at,
                caused_by=decision.caused_by,
                threshold_event_id=decision.threshold_event_id,
                labels_since_last=decision.evaluation.pending_labels,
                effective_threshold=decision.evaluation.effective_threshold,
                excluded_label_count=decision.excluded_label_count,
                evaluation=decision.evaluation.model_dump(mode="json"),
            )
        )

    async def emit(self, event: Event[Any]) -> None:
        await add_event(self._session, event)


class SqlStore:
    """The monitor's state in its PostgreSQL schema."""

    def __init__(self, db: Database, consumer: str) -> None:
        self._db = db
        self._consumer = consumer

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqlTransaction]:
        async with self._db.transaction() as session:
            yield SqlTransaction(session, self._consumer)

    async def project(self, project_id: str) -> ProjectState | None:
        async with self._db.transaction() as session:
            row = (
                await session.execute(select(projects).where(projects.c.project_id == project_id))
            ).first()
        return None if row is None else _state(row._mapping)

    async def projects_with_pending(self) -> list[str]:
        async with self._db.transaction() as session:
            rows = await session.execute(
                select(projects.c.project_id)
                .where(projects.c.pending_labels > 0)
                .order_by(projects.c.project_id)
            )
            return list(rows.scalars())

    async def quarantined_count(self, project_id: str) -> int:
        async with self._db.transaction() as session:
            result = await session.execute(
                select(func.count())
                .select_from(quarantined_labels)
                .where(quarantined_labels.c.project_id == project_id)
            )
            return int(result.scalar_one())

    async def decisions(self, project_id: str, limit: int) -> list[Decision]:
        async with self._db.transaction() as session:
            rows = await session.execute(
                select(decisions)
                .where(decisions.c.project_id == project_id)
                .order_by(decisions.c.decided_at.desc(), decisions.c.decision_id)
                .limit(limit)
            )
            return [
                Decision(
                    decision_id=row.decision_id,
                    project_id=row.project_id,
                    model_line=row.model_line,
                    snapshot_id=row.snapshot_id,
                    reason=row.reason,
                    decided_at=row.decided_at,
                    trigger=row.trigger,
                    caused_by=row.caused_by,
                    threshold_event_id=row.threshold_event_id,
                    excluded_label_count=row.excluded_label_count,
                    evaluation=Evaluation.model_validate(row.evaluation),
                )
                for row in rows
            ]

    async def reports(self, project_id: str, limit: int) -> list[QualityReport]:
        async with self._db.transaction() as session:
            rows = await session.execute(
                select(quality_reports)
                .where(quality_reports.c.project_id == project_id)
                .order_by(quality_reports.c.created_at.desc(), quality_reports.c.report_id)
                .limit(limit)
            )
            return [QualityReport.model_validate(dict(row._mapping)) for row in rows]


def _values(model: BaseModel, table: Table) -> dict[str, Any]:
    """A model as column values: JSON columns get JSON-ready data, the others Python objects."""
    plain = model.model_dump()
    as_json = model.model_dump(mode="json")
    return {
        column.name: (as_json if isinstance(column.type, JSONB) else plain)[column.name]
        for column in table.c
        if column.name in plain
    }


def _state(row: RowMapping) -> ProjectState:
    return ProjectState.model_validate({name: row[name] for name in _STATE_COLUMNS})
