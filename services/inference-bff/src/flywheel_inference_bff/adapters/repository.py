"""``JobStore`` and ``RouteStore`` on PostgreSQL.

Jobs are claimed with ``FOR UPDATE SKIP LOCKED``, so replicas sweeping together never take the
same job, and every write after the claim names its owner: a replica that lost its lease (it
stalled past ``job_lease_s`` and another took over) finds its writes refused and stops. Lease
times are the database's clock, the one clock every replica shares.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import RowMapping, insert, or_, select, tuple_, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.sql import func

from flywheel_inference_bff.adapters.tables import batch_jobs, line_projects, routes
from flywheel_inference_bff.ports import BatchJob, JobState, Progress
from flywheel_inference_bff.routing import LineRoute
from flywheel_runtime.db import Database

_ACTIVE = (JobState.QUEUED.value, JobState.RUNNING.value)


class SqlJobStore:
    """Batch jobs in the service's schema."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, job: BatchJob) -> None:
        async with self._db.transaction() as session:
            await session.execute(insert(batch_jobs).values(_values(job)))

    async def get(self, job_id: uuid.UUID) -> BatchJob | None:
        async with self._db.transaction() as session:
            row = (
                await session.execute(select(batch_jobs).where(batch_jobs.c.job_id == job_id))
            ).first()
        return None if row is None else _job(row._mapping)

    async def claim(self, owner: str, lease_s: float) -> BatchJob | None:
        now = func.now()
        claimable = (
            select(batch_jobs.c.job_id)
            .where(
                or_(
                    batch_jobs.c.state == JobState.QUEUED.value,
                    (batch_jobs.c.state == JobState.RUNNING.value)
                    & (batch_jobs.c.heartbeat_at < now - timedelta(seconds=lease_s)),
                )
            )
            .order_by(batch_jobs.c.created_at)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        statement = (
            update(batch_jobs)
            .where(batch_jobs.c.job_id == claimable)
            .values(
                state=JobState.RUNNING.value,
                owner=owner,
                attempts=batch_jobs.c.attempts + 1,
                heartbeat_at=now,
                updated_at=now,
            )
            .returning(*batch_jobs.c)
        )
        async with self._db.transaction() as session:
            row = (await session.execute(statement)).first()
        return None if row is None else _job(row._mapping)

    async def progress(self, job_id: uuid.UUID, owner: str, progress: Progress) -> bool:
        return await self._owned_update(
            job_id,
            owner,
            total=progress.total,
            done=progress.done,
            errors=progress.errors,
            next_chunk=progress.next_chunk,
            error_samples=[e.model_dump(mode="json") for e in progress.error_samples],
        )

    async def finish(
        self, job_id: uuid.UUID, owner: str, state: JobState, failure: str | None = None
    ) -> bool:
        return await self._owned_update(
            job_id, owner, state=state.value, failure=failure, finished_at=func.now()
        )

    async def release(self, job_id: uuid.UUID, owner: str) -> bool:
        values = {"state": JobState.QUEUED.value, "owner": None}
        return await self._owned_update(job_id, owner, attempts=batch_jobs.c.attempts - 1, **values)

    async def _owned_update(self, job_id: uuid.UUID, holder: str, **values: Any) -> bool:
        statement = (
            update(batch_jobs)
            .where(
                batch_jobs.c.job_id == job_id,
                batch_jobs.c.owner == holder,
                batch_jobs.c.state.in_(_ACTIVE),
            )
            .values(heartbeat_at=func.now(), updated_at=func.now(), **values)
            .returning(batch_jobs.c.job_id)
        )
        async with self._db.transaction() as session:
            return (await session.execute(statement)).first() is not None


class SqlRouteStore:
    """The newest routing weights and the projects of model lines."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def load_routes(self) -> list[LineRoute]:
        async with self._db.transaction() as session:
            rows = (await session.execute(select(routes))).all()
        return [LineRoute(**dict(row._mapping)) for row in rows]

    async def save_route(self, route: LineRoute) -> None:
        values = {column.name: getattr(route, column.name) for column in routes.c}
        statement = pg_insert(routes).values(values)
        statement = statement.on_conflict_do_update(
            index_elements=[routes.c.model_line],
            set_={name: statement.excluded[name] for name in values if name != "model_line"},
            # Newest wins here as in memory: a replica applying an old event changes nothing.
            where=tuple_(routes.c.occurred_at, routes.c.sequence)
            < tuple_(statement.excluded.occurred_at, statement.excluded.sequence),
        )
        async with self._db.transaction() as session:
            await session.execute(statement)

    async def load_projects(self) -> dict[str, str]:
        async with self._db.transaction() as session:
            rows = (await session.execute(select(line_projects))).all()
        return {row.model_line: row.project_id for row in rows}

    async def save_project(self, model_line: str, project_id: str) -> None:
        statement = pg_insert(line_projects).values(model_line=model_line, project_id=project_id)
        statement = statement.on_conflict_do_update(
            index_elements=[line_projects.c.model_line], set_={"project_id": project_id}
        )
        async with self._db.transaction() as session:
            await session.execute(statement)


def _values(job: BatchJob) -> dict[str, Any]:
    """The record as column values: JSON columns get JSON-ready data, the others Python objects."""
    plain = job.model_dump()
    as_json = job.model_dump(mode="json")
    return {
        column.name: (as_json if isinstance(column.type, JSONB) else plain)[column.name]
        for column in batch_jobs.c
    }


def _job(row: RowMapping) -> BatchJob:
    return BatchJob.model_validate({column.name: row[column.name] for column in batch_jobs.c})
