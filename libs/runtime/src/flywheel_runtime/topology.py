"""RabbitMQ topology: exchanges, quorum queues with bounded delivery, dead-letter queues.

Names come from ``flywheel_contracts.topology``; a ``namespace`` prefix keeps test runs and
parallel environments apart on one broker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from faststream.rabbit import ExchangeType, QueueType, RabbitBroker, RabbitExchange, RabbitQueue

from flywheel_contracts import Event

if TYPE_CHECKING:
    from faststream.rabbit.schemas.queue import QuorumQueueArgs
from flywheel_contracts.topology import (
    DEAD_LETTER_EXCHANGE,
    EVENTS_EXCHANGE,
    INFERENCE_EXCHANGE,
    dead_letter_queue_name,
    queue_name,
)


@dataclass
class Topology:
    """Builds and declares the exchanges and queues one service uses."""

    namespace: str = ""
    """Prefix of every exchange and queue name (empty in production)."""
    delivery_limit: int = 5
    """Deliveries of a message before its queue dead-letters it."""
    _dead_letter_queues: dict[str, RabbitQueue] = field(default_factory=dict, repr=False)

    @property
    def events_exchange(self) -> RabbitExchange:
        return self._topic(EVENTS_EXCHANGE)

    @property
    def inference_exchange(self) -> RabbitExchange:
        return self._topic(INFERENCE_EXCHANGE)

    @property
    def dead_letter_exchange(self) -> RabbitExchange:
        return RabbitExchange(
            self.namespace + DEAD_LETTER_EXCHANGE, type=ExchangeType.DIRECT, durable=True
        )

    def exchange_for(self, event: type[Event[Any]]) -> RabbitExchange:
        """The exchange an event class is published to."""
        return self._topic(event.EXCHANGE)

    def queue(self, service: str, event: type[Event[Any]], **arguments: Any) -> RabbitQueue:
        """The durable quorum queue of ``service``'s subscription to ``event``.

        A message is delivered at most ``delivery_limit`` + 1 times, then dead-lettered into
        ``<queue>.dlq``; other messages keep flowing meanwhile.
        """
        name = self.namespace + queue_name(service, event.routing_key())
        dead_letter = dead_letter_queue_name(name)
        self._dead_letter_queues[name] = RabbitQueue(
            dead_letter, queue_type=QueueType.QUORUM, durable=True, routing_key=dead_letter
        )
        return RabbitQueue(
            name,
            queue_type=QueueType.QUORUM,
            durable=True,
            routing_key=event.routing_key(),
            arguments=cast(
                "QuorumQueueArgs",
                {
                    "x-delivery-limit": self.delivery_limit,
                    "x-dead-letter-exchange": self.dead_letter_exchange.name,
                    "x-dead-letter-routing-key": dead_letter,
                    **arguments,
                },
            ),
        )

    def dead_letter_queue(self, queue: str) -> RabbitQueue:
        """The dead-letter queue of a queue built by ``queue()``."""
        return self._dead_letter_queues[queue]

    @property
    def queue_names(self) -> list[str]:
        """Every subscription queue and its dead-letter queue built so far."""
        names: list[str] = []
        for name, dead_letter in self._dead_letter_queues.items():
            names += [name, dead_letter.name]
        return names

    async def declare(self, broker: RabbitBroker) -> None:
        """Declare exchanges and dead-letter queues; call after connect, before start.

        Dead-lettering into an exchange that does not exist drops the message silently, so the
        dead-letter side must exist before the first delivery can fail.
        """
        for exchange in (self.events_exchange, self.inference_exchange):
            await broker.declare_exchange(exchange)
        dlx = await broker.declare_exchange(self.dead_letter_exchange)
        for dead_letter in self._dead_letter_queues.values():
            declared = await broker.declare_queue(dead_letter)
            await declared.bind(dlx, routing_key=dead_letter.name)

    def _topic(self, name: str) -> RabbitExchange:
        return RabbitExchange(self.namespace + name, type=ExchangeType.TOPIC, durable=True)
