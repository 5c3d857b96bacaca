"""RabbitMQ topology: exchanges, quorum queues with bounded delivery, dead-letter queues.

Names come from ``flywheel_contracts.topology``; a ``namespace`` prefix keeps test runs and
parallel environments apart on one broker. Every consuming queue has a dead-letter queue, the
per-replica queues of events every replica must see included (``replica_queue``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from faststream.rabbit import ExchangeType, QueueType, RabbitBroker, RabbitExchange, RabbitQueue

from flywheel_contracts import Event

if TYPE_CHECKING:
    from faststream.rabbit.schemas.queue import ClassicQueueArgs, QuorumQueueArgs
from flywheel_contracts.topology import (
    DEAD_LETTER_EXCHANGE,
    EVENTS_EXCHANGE,
    INFERENCE_EXCHANGE,
    dead_letter_queue_name,
    queue_name,
    replica_queue_name,
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
        return RabbitQueue(
            name,
            queue_type=QueueType.QUORUM,
            durable=True,
            routing_key=event.routing_key(),
            arguments=cast(
                "QuorumQueueArgs",
                {
                    "x-delivery-limit": self.delivery_limit,
                    **self._dead_lettering(name, dead_letter_queue_name(name)),
                    **arguments,
                },
            ),
        )

    def replica_queue(self, service: str, event: type[Event[Any]], replica: str) -> RabbitQueue:
        """One replica's own queue of ``service``'s subscription to ``event``, for events every
        replica must see: ``<ns><service>.<event>.<replica>``, exclusive to the replica's
        connection and deleted with it.

        Its dead letters go to the subscription's ``<ns><service>.<event>.dlq``: one durable
        quorum queue that every replica shares, not one per replica. A dead-letter queue that
        went with its replica (auto-delete) would take the poison, the evidence, along unread;
        one that outlived it would be an orphan under a replica id nobody knows, growing with
        every restart. The shared one survives replicas, is listed under the subscription's
        name like every other queue's, and each message in it names the replica queue it came
        from (``x-flywheel-queue``).

        A classic queue honours no ``x-delivery-limit`` and counts no deliveries (RabbitMQ
        refuses the argument): the consumer middleware counts them itself, exactly, since one
        consumer reads an exclusive queue, and dead-letters at ``delivery_limit``.
        """
        subscription = self.namespace + queue_name(service, event.routing_key())
        name = replica_queue_name(subscription, replica)
        return RabbitQueue(
            name,
            durable=False,
            exclusive=True,
            auto_delete=True,
            routing_key=event.routing_key(),
            arguments=cast(
                "ClassicQueueArgs",
                self._dead_lettering(name, dead_letter_queue_name(subscription)),
            ),
        )

    def dead_letter_queue(self, queue: str) -> RabbitQueue:
        """The dead-letter queue of a queue built by ``queue()`` or ``replica_queue()``."""
        return self._dead_letter_queues[queue]

    @property
    def queue_names(self) -> list[str]:
        """Every subscription queue and its dead-letter queue built so far (a shared one once)."""
        names: list[str] = []
        for name, dead_letter in self._dead_letter_queues.items():
            names += [name, dead_letter.name]
        return list(dict.fromkeys(names))

    def _dead_lettering(self, queue: str, dead_letter: str) -> dict[str, str]:
        """Remember ``queue``'s dead-letter queue (declared by ``declare``) and return the
        queue arguments that dead-letter into it."""
        self._dead_letter_queues[queue] = RabbitQueue(
            dead_letter, queue_type=QueueType.QUORUM, durable=True, routing_key=dead_letter
        )
        return {
            "x-dead-letter-exchange": self.dead_letter_exchange.name,
            "x-dead-letter-routing-key": dead_letter,
        }

    async def declare(self, broker: RabbitBroker) -> None:
        """Declare exchanges and dead-letter queues; call after connect, before start.

        Dead-lettering into an exchange that does not exist drops the message silently, so the
        dead-letter side must exist before the first delivery can fail.
        """
        for exchange in (self.events_exchange, self.inference_exchange):
            await broker.declare_exchange(exchange)
        dlx = await broker.declare_exchange(self.dead_letter_exchange)
        shared = {q.name: q for q in self._dead_letter_queues.values()}
        for dead_letter in shared.values():
            declared = await broker.declare_queue(dead_letter)
            await declared.bind(dlx, routing_key=dead_letter.name)

    def _topic(self, name: str) -> RabbitExchange:
        return RabbitExchange(self.namespace + name, type=ExchangeType.TOPIC, durable=True)
