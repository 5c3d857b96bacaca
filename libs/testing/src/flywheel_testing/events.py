"""An event probe: a queue on a test topology that records what services publish."""

from __future__ import annotations

import json
import uuid
from types import TracebackType
from typing import Any, Self, TypeVar

import aio_pika
from aiormq.exceptions import ChannelInvalidStateError

from flywheel_contracts import ALL_EVENTS, Event
from flywheel_runtime.topology import Topology
from flywheel_testing.wait import wait_for

E = TypeVar("E", bound=Event[Any])

_BY_TYPE: dict[str, type[Event[Any]]] = {cls.TYPE: cls for cls in ALL_EVENTS}


class EventProbe:
    """Binds a fresh queue to the exchanges of ``events`` and parses what arrives, typed."""

    def __init__(
        self,
        rabbit_url: str,
        topology: Topology,
        *events: type[Event[Any]],
        durable: bool = False,
    ) -> None:
        """``durable``: the queue (and what it holds) outlives a broker restart."""
        self.rabbit_url = rabbit_url
        self.durable = durable
        self.topology = topology
        self.event_types = events
        self.events: list[Event[Any]] = []
        self.name = f"{topology.namespace}probe-{uuid.uuid4().hex[:8]}"
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None

    async def start(self) -> None:
        self._connection = await aio_pika.connect_robust(self.rabbit_url)
        channel = await self._connection.channel()
        self._queue = await channel.declare_queue(self.name, durable=self.durable)
        for event_type in self.event_types:
            spec = self.topology.exchange_for(event_type)
            exchange = await channel.declare_exchange(
                spec.name, aio_pika.ExchangeType.TOPIC, durable=True
            )
            await self._queue.bind(exchange, routing_key=event_type.routing_key())

    async def stop(self) -> None:
        if self._queue is not None:
            await self._queue.delete(if_unused=False, if_empty=False)
        if self._connection is not None:
            await self._connection.close()

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

    async def collect(self) -> list[Event[Any]]:
        """Take every message waiting in the probe's queue."""
        if self._queue is None:
            raise RuntimeError("probe not started")
        try:
            while (message := await self._queue.get(no_ack=True, fail=False)) is not None:
                body = json.loads(message.body)
                self.events.append(_BY_TYPE[body["type"]].model_validate(body))
        except (aio_pika.exceptions.AMQPError, ChannelInvalidStateError, ConnectionError):
            # The broker is away or just back: the robust connection restores the channel,
            # and a durable probe's queue kept what arrived; the next call reads on.
            pass
        return self.events

    def of(self, event_type: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, event_type)]

    async def wait(self, event_type: type[E], n: int = 1, timeout: float = 15) -> list[E]:  # noqa: ASYNC109
        """At least ``n`` events of ``event_type``, or a timeout naming what was missing."""

        async def enough() -> bool:
            await self.collect()
            return len(self.of(event_type)) >= n

        await wait_for(enough, timeout=timeout, message=f"{n} {event_type.TYPE}")
        return self.of(event_type)
