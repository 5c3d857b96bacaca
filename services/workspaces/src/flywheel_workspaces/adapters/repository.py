"""``WorkspaceStore`` on PostgreSQL: the two tables plus the runtime's outbox.

Admissions (and the quota checks that precede them) serialize on a transaction-level advisory
lock, so two requests never both see the same free GPUs or the same unused quota; the rows
themselves are locked one by one (``SELECT … FOR UPDATE``) by whoever changes them, for as
long as the backend call that goes with the change takes.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import RowMapping, Select, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from flywheel_contracts import Event
from flywheel_runtime.db import Database
from flywheel_runtime.outbox import add_event
from flywheel_workspaces.adapters.tables import holdings, workspaces
from flywheel_workspaces.ports import (
    Holding,
    StopReason,
    Workspace,
    WorkspaceState,
)

_TERMINAL = [s.value for s in WorkspaceState if s.terminal]
_FIFO = (func.coalesce(workspaces.c.queued_at, workspaces.c.requested_at), workspaces.c.seq)
_NOT_WRITTEN = ("workspace_id", "seq", "updated_at")


class SqlTransaction:
    """One transaction on the service's schema."""

    def __init__(self, session: AsyncSession, lock_key: str) -> None:
        self._session = session
        self._lock_key = lock_key

    async def lock(self, workspace_id: uuid.UUID) -> Workspace | None:
        row = (
            await self._session.execute(
                select(workspaces)
                .where(workspaces.c.workspace_id == workspace_id)
                .with_for_update()
            )
        ).first()
        return None if row is None else _workspace(row._mapping)

    async def lock_admission(self) -> list[Workspace]:
        await self._session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": self._lock_key}
        )
        rows = await self._session.execute(
            select(workspaces).where(workspaces.c.state.not_in(_TERMINAL)).order_by(*_FIFO)
        )
        return [_workspace(row._mapping) for row in rows]

    async def by_request(self, owner: str, request_id: uuid.UUID) -> Workspace | None:
        row = (
            await self._session.execute(
                select(workspaces).where(
                    workspaces.c.owner == owner, workspaces.c.request_id == request_id
                )
            )
        ).first()
        return None if row is None else _workspace(row._mapping)

    async def save(self, workspace: Workspace) -> None:
        values = _values(workspace)
        await self._session.execute(
            insert(workspaces)
            .values(workspace_id=workspace.workspace_id, **values)
            .on_conflict_do_update(
                index_elements=[workspaces.c.workspace_id],
                set_={**values, "updated_at": func.now()},
            )
        )

    async def open_holding(self, holding: Holding) -> None:
        await self._session.execute(
            insert(holdings).values(**holding.model_dump(exclude={"ended_at", "reason"}))
        )

    async def close_holding(
        self, workspace_id: uuid.UUID, ended_at: datetime, reason: StopReason
    ) -> None:
        await self._session.execute(
            update(holdings)
            .where(holdings.c.workspace_id == workspace_id, holdings.c.ended_at.is_(None))
            .values(ended_at=ended_at, reason=reason.value)
        )

    async def emit(self, event: Event[Any]) -> None:
        await add_event(self._session, event)


class SqlWorkspaceStore:
    """The environments and their holding intervals in the service's PostgreSQL schema."""

    def __init__(self, db: Database) -> None:
        self._db = db
        # Advisory locks are per database: the schema keeps two deployments sharing one apart.
        self._lock_key = f"{db.schema}.workspaces:admission"

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqlTransaction]:
        async with self._db.transaction() as session:
            yield SqlTransaction(session, self._lock_key)

    async def get(self, workspace_id: uuid.UUID) -> Workspace | None:
        async with self._db.transaction() as session:
            row = (
                await session.execute(
                    select(workspaces).where(workspaces.c.workspace_id == workspace_id)
                )
            ).first()
        return None if row is None else _workspace(row._mapping)

    async def holdings(
        self, since: datetime, until: datetime, *, owner: str | None = None
    ) -> list[Holding]:
        query: Select[Any] = select(holdings).where(
            holdings.c.started_at < until,
            (holdings.c.ended_at.is_(None)) | (holdings.c.ended_at > since),
        )
        if owner is not None:
            query = query.where(holdings.c.owner == owner)
        async with self._db.transaction() as session:
            rows = await session.execute(
                query.order_by(holdings.c.started_at, holdings.c.holding_id)
            )
            return [
                Holding.model_validate({c.name: row._mapping[c.name] for c in holdings.c})
                for row in rows
            ]

    async def list(
        self, *, owner: str | None = None, states: frozenset[WorkspaceState] | None = None
    ) -> list[Workspace]:
        query: Select[Any] = select(workspaces)
        if owner is not None:
            query = query.where(workspaces.c.owner == owner)
        if states is not None:
            query = query.where(workspaces.c.state.in_(sorted(s.value for s in states)))
        async with self._db.transaction() as session:
            rows = await session.execute(query.order_by(*_FIFO))
            return [_workspace(row._mapping) for row in rows]


def _values(workspace: Workspace) -> dict[str, Any]:
    """An environment as column values: its spec and connection as JSON."""
    plain = workspace.model_dump(exclude={"spec", "connection", "queue_position"})
    values = {
        column.name: plain[column.name]
        for column in workspaces.c
        if column.name in plain and column.name not in _NOT_WRITTEN
    }
    spec = workspace.spec
    values |= {
        "spec": spec.model_dump(mode="json"),
        "gpu_type": spec.gpu_type,
        "gpu_count": spec.gpu_count,
        "mode": spec.mode.value,
        "state": workspace.state.value,
        "stop_reason": None if workspace.stop_reason is None else workspace.stop_reason.value,
        "connection": None
        if workspace.connection is None
        else workspace.connection.model_dump(mode="json"),
    }
    return values


def _workspace(row: RowMapping) -> Workspace:
    fields = {
        name: row[name]
        for name in Workspace.model_fields
        if name in row and name not in ("queue_position",)
    }
    return Workspace.model_validate(fields)
