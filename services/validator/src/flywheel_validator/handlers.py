"""The broker subscription: ``model.trained`` in, ``model.validated`` out through the outbox.

The handler only hands the typed event to ``Validator``; errors are turned into acks by the
runtime's middleware (retryable → redelivery, anything else, a malformed event included →
dead-letter queue).
"""

from __future__ import annotations

from faststream.rabbit import RabbitBroker

from flywheel_contracts import ModelTrainedV1, ModelValidatedV1
from flywheel_runtime.asyncapi import declare_publishes
from flywheel_runtime.topology import Topology
from flywheel_validator.service import Validator
from flywheel_validator.settings import SERVICE


def register(broker: RabbitBroker, topology: Topology, validator: Validator) -> None:
    """Subscribe the validator to model.trained and document what it publishes."""

    @broker.subscriber(
        topology.queue(SERVICE, ModelTrainedV1),
        topology.exchange_for(ModelTrainedV1),
        title=f"{SERVICE}.{ModelTrainedV1.routing_key()}:consume",
        description=(
            "Scores the new version and the champion on the snapshot's held-out TEST split and "
            "applies the project's gates (accuracy, macro-F1, per-class recall, latency, export "
            "parity, size)."
        ),
    )
    async def on_model_trained(event: ModelTrainedV1) -> None:
        """Reacts to model.trained; emits model.validated (passed or failed) once per event."""
        await validator.model_trained(event)

    declare_publishes(
        broker,
        topology,
        ModelValidatedV1,
        "The verdict on a trained version, with candidate and champion metrics and one reason "
        "per gate; a passed version already carries the registry alias `challenger`.",
    )
