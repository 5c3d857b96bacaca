"""``Bus`` on the service's broker: publishes at once, with the broker's confirm."""

from __future__ import annotations

from typing import Any

from faststream.rabbit import RabbitBroker

from flywheel_contracts import Event
from flywheel_runtime.messaging import publish_event
from flywheel_runtime.topology import Topology


class BrokerBus:
    """Publishes events that change no state (republished weights) outside the outbox."""

    def __init__(self, broker: RabbitBroker, topology: Topology) -> None:
        self._broker = broker
        self._topology = topology

    async def publish(self, event: Event[Any]) -> None:
        await publish_event(self._broker, self._topology, event)
