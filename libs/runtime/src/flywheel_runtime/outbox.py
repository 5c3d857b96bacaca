"""Transactional outbox: events are written with the state change and published afterwards.

``add_event`` inserts the event in the caller's transaction, so an accepted change is never
lost while RabbitMQ is down. ``OutboxRelay`` publishes pending rows with publisher confirms and
marks them sent; a crash between publish and mark republishes, which consumers absorb through
``processed_messages``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog
from faststream.rabbit import RabbitBroker
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    Uuid,
    func,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from flywheel_contracts import Event
from flywheel_runtime.db import OUTBOX_DIRTY, Database
from flywheel_runtime.failpoints import failpoint
from flywheel_runtime.telemetry import TRACE_CONTEXTS
from flywheel_runtime.topology import Topology

log = structlog.get_logger(__name__)

runtime_metadata = MetaData()
"""Tables every service schema has; created by the runtime's own migrations."""

outbox = Table(
    "outbox",
    runtime_metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("event_id", Uuid, nullable=False, unique=True),
    Column("event_type", String(200), nullable=False),
    Column("exchange", String(200), nullable=False),
    Column("routing_key", String(200), nullable=False),
    Column("body", JSONB, nullable=False),
    Column("headers", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("published_at", DateTime(timezone=True)),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text),
    Index("outbox_pending", "id", postgresql_where="published_at IS NULL"),
)


async def add_event(session: AsyncSession, event: Event[Any]) -> None:
    """Queue ``event`` for publishing in the caller's transaction.

    The current trace context is stored with it, so the consumer's span joins the trace of the
    request that caused the event even though a relay publishes it later. Outside any span (a
    background loop's work) it is the context its correlation id was last consumed under.
    """
    headers: dict[str, str] = {}
    context = None
    if not trace.get_current_span().get_span_context().is_valid:
        context = TRACE_CONTEXTS.recall(str(event.correlation_id))
    propagate.inject(headers, context=context)
    session.info[OUTBOX_DIRTY] = True
    await session.execute(
        outbox.insert().values(
            event_id=event.event_id,
            event_type=event.type,
            exchange=event.EXCHANGE,
            routing_key=event.routing_key(),
            body=json.loads(event.model_dump_json()),
            headers=headers,
        )
    )


@dataclass(frozen=True)
class OutboxMessage:
    """One pending row, as the relay hands it to a publisher."""

    id: int
    event_id: str
    event_type: str
    exchange: str
    routing_key: str
    body: Mapping[str, Any]
    headers: Mapping[str, str]


class OutboxPublisher(Protocol):
    async def publish(self, message: OutboxMessage) -> None:
        """Publish and return only once the broker confirmed."""


class BrokerOutboxPublisher:
    """Publishes outbox rows through a FastStream broker under the row's trace context."""

    def __init__(self, broker: RabbitBroker, topology: Topology, *, timeout_s: float = 5.0):
        self._broker = broker
        self._topology = topology
        self._timeout_s = timeout_s

    async def publish(self, message: OutboxMessage) -> None:
        token = otel_context.attach(propagate.extract(dict(message.headers)))
        try:
            exchange = self._topology.namespace + message.exchange
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that
            # lands as the call completes, and the relay's stop() then waits forever.
            async with asyncio.timeout(self._timeout_s):
                await self._broker.publish(
                    dict(message.body),
                    exchange=exchange,
                    routing_key=message.routing_key,
                    message_id=message.event_id,
                    correlation_id=str(message.body.get("correlation_id", message.event_id)),
                    message_type=message.event_type,
                    persist=True,
                    mandatory=False,
                )
        finally:
            otel_context.detach(token)


class OutboxRelay:
    """Publishes pending outbox rows in order of writing; safe to run in several replicas."""

    def __init__(
        self,
        db: Database,
        publisher: OutboxPublisher,
        *,
        batch_size: int = 200,
        poll_interval_s: float = 0.5,
        max_backoff_s: float = 10.0,
    ) -> None:
        self._db = db
        self._publisher = publisher
        self._batch_size = batch_size
        self._poll_interval_s = poll_interval_s
        self._max_backoff_s = max_backoff_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        db.on_outbox_commit(self.wake)

    def wake(self) -> None:
        """Publish now instead of at the next poll."""
        self._wake.set()

    async def publish_pending(self) -> int:
        """Publish one batch; returns how many rows were published.

        Rows are locked with SKIP LOCKED so two relays never publish the same batch at once.
        Rows whose publish failed stay pending with their attempt count and last error.
        """
        async with self._db.transaction() as session:
            rows = (
                await session.execute(
                    select(outbox)
                    .where(outbox.c.published_at.is_(None))
                    .order_by(outbox.c.id)
                    .limit(self._batch_size)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if not rows:
                return 0
            messages = [
                OutboxMessage(
                    id=row.id,
                    event_id=str(row.event_id),
                    event_type=row.event_type,
                    exchange=row.exchange,
                    routing_key=row.routing_key,
                    body=row.body,
                    headers=row.headers,
                )
                for row in rows
            ]
            results = await asyncio.gather(
                *(self._publisher.publish(m) for m in messages), return_exceptions=True
            )
            sent = [m.id for m, r in zip(messages, results, strict=True) if r is None]
            if sent:
                failpoint("outbox.published", {m.event_type for m in messages if m.id in sent})
            failed = [
                (m.id, r)
                for m, r in zip(messages, results, strict=True)
                if isinstance(r, BaseException)
            ]
            if sent:
                await session.execute(
                    update(outbox)
                    .where(outbox.c.id.in_(sent))
                    .values(published_at=datetime.now(UTC), attempts=outbox.c.attempts + 1)
                )
            for row_id, error in failed:
                await session.execute(
                    update(outbox)
                    .where(outbox.c.id == row_id)
                    .values(attempts=outbox.c.attempts + 1, last_error=repr(error)[:2000])
                )
        if failed:
            raise PublishFailedError(f"{len(failed)} of {len(messages)} outbox rows not published")
        return len(sent)

    async def run(self) -> None:
        """Publish until cancelled, backing off while the broker or database is away."""
        backoff = self._poll_interval_s
        while True:
            # Clear before reading: a commit that lands while we publish sets it again.
            self._wake.clear()
            try:
                published = await self.publish_pending()
                backoff = self._poll_interval_s
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("outbox relay failed; retrying", error=repr(error), retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)
                continue
            if published >= self._batch_size:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval_s):
                    await self._wake.wait()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="outbox-relay")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class PublishFailedError(Exception):
    """Some rows of a batch were not confirmed by the broker; they stay pending."""


async def pending_count(session: AsyncSession) -> int:
    """Rows not yet published (for readiness and metrics)."""
    result = await session.execute(
        select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None))
    )
    return int(result.scalar_one())
