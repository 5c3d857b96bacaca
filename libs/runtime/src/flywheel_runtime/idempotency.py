"""Idempotent consumers: an event changes a service's state at most once.

``claim`` records ``(consumer, event_id)`` in the same transaction as the state change. A
redelivered event finds its row and the handler does nothing; two replicas racing on the same
event serialize on the primary key, and the loser sees the winner's row once it commits.
"""

from __future__ import annotations

import uuid

from sqlalchemy import Column, DateTime, String, Table, Uuid, func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from flywheel_runtime.outbox import runtime_metadata

processed_messages = Table(
    "processed_messages",
    runtime_metadata,
    Column("consumer", String(200), primary_key=True),
    Column("event_id", Uuid, primary_key=True),
    Column("processed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)


async def claim(session: AsyncSession, consumer: str, event_id: uuid.UUID) -> bool:
    """True the first time ``consumer`` sees ``event_id`` in a committed transaction."""
    result = await session.execute(
        insert(processed_messages)
        .values(consumer=consumer, event_id=event_id)
        .on_conflict_do_nothing()
        .returning(processed_messages.c.event_id)
    )
    return result.first() is not None
