"""``Store`` on PostgreSQL: validations, plus the runtime's outbox and idempotency claim."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import RowMapping, insert, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from flywheel_contracts import Event
from flywheel_runtime.db import Database
from flywheel_runtime.idempotency import claim
from flywheel_runtime.outbox import add_event
from flywheel_validator.adapters.tables import validations
from flywheel_validator.ports import Validation


class SqlTransaction:
    """One transaction on the validator's schema."""

    def __init__(self, session: AsyncSession, consumer: str) -> None:
        self._session = session
        self._consumer = consumer

    async def claim(self, event_id: uuid.UUID) -> bool:
        return await claim(self._session, self._consumer, event_id)

    async def add(self, validation: Validation) -> None:
        await self._session.execute(insert(validations).values(_values(validation)))

    async def emit(self, event: Event[Any]) -> None:
        await add_event(self._session, event)


class SqlStore:
    """The validator's state in its PostgreSQL schema."""

    def __init__(self, db: Database, consumer: str) -> None:
        self._db = db
        self._consumer = consumer

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqlTransaction]:
        async with self._db.transaction() as session:
            yield SqlTransaction(session, self._consumer)

    async def by_event(self, event_id: uuid.UUID) -> Validation | None:
        return await self._one(validations.c.event_id == event_id)

    async def get(self, validation_id: uuid.UUID) -> Validation | None:
        return await self._one(validations.c.validation_id == validation_id)

    async def recent(self, model_line: str | None, limit: int) -> list[Validation]:
        query = select(validations)
        if model_line is not None:
            query = query.where(validations.c.model_line == model_line)
        query = query.order_by(validations.c.created_at.desc(), validations.c.validation_id).limit(
            limit
        )
        async with self._db.transaction() as session:
            rows = await session.execute(query)
            return [_validation(row._mapping) for row in rows]

    async def _one(self, condition: Any) -> Validation | None:
        async with self._db.transaction() as session:
            row = (await session.execute(select(validations).where(condition))).first()
        return None if row is None else _validation(row._mapping)


def _values(validation: Validation) -> dict[str, Any]:
    """The record as column values: JSON columns get JSON-ready data, the others Python objects."""
    plain = validation.model_dump()
    as_json = validation.model_dump(mode="json")
    return {
        column.name: (as_json if isinstance(column.type, JSONB) else plain)[column.name]
        for column in validations.c
    }


def _validation(row: RowMapping) -> Validation:
    return Validation.model_validate({column.name: row[column.name] for column in validations.c})
