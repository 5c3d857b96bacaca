"""Following the control loop on the bus, as an observer.

The follower binds a queue of its own (exclusive, deleted when it disconnects) to the events
exchange with ``#``, so it sees every control-loop event without taking a message from any
service's queue.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from types import TracebackType
from typing import Any, Self

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from flywheel_contracts import ALL_EVENTS, Event
from flywheel_contracts.topology import EVENTS_EXCHANGE

EVENT_TYPES: dict[str, type[Event[Any]]] = {cls.TYPE: cls for cls in ALL_EVENTS}


def parse_event(body: bytes) -> Event[Any] | None:
    """The typed event in a message body; None for a type (or version) this CLI does not know."""
    try:
        raw = json.loads(body)
    except ValueError:
        return None
    if not isinstance(raw, dict):
        return None
    event_type = EVENT_TYPES.get(str(raw.get("type")))
    if event_type is None or raw.get("schema_version", event_type.VERSION) != event_type.VERSION:
        return None
    return event_type.model_validate(raw)


class EventFollower:
    """Every event published on ``<namespace>flywheel.events`` from ``start`` on."""

    def __init__(self, rabbit_url: str, namespace: str = "") -> None:
        self.rabbit_url = rabbit_url
        self.exchange_name = namespace + EVENTS_EXCHANGE
        self.queue_name = f"{namespace}flywheel-cli-{uuid.uuid4().hex[:8]}"
        self._events: asyncio.Queue[Event[Any]] = asyncio.Queue()
        self._connection: AbstractRobustConnection | None = None

    async def start(self) -> None:
        self._connection = await aio_pika.connect_robust(self.rabbit_url)
        channel = await self._connection.channel()
        exchange = await channel.declare_exchange(
            self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(self.queue_name, exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key="#")
        await queue.consume(self._on_message, no_ack=True)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        event = parse_event(message.body)
        if event is not None:
            self._events.put_nowait(event)

    async def next(self, timeout_s: float) -> Event[Any] | None:
        """The next event, or None when none arrives within ``timeout_s``."""
        try:
            return await asyncio.wait_for(self._events.get(), timeout_s)
        except TimeoutError:
            return None

    async def stop(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
