"""What labeling reacts to on the broker: labels.requested fills the needs-label queue.

The handler only hands the typed event to ``LabelRequestQueue``; errors are turned into acks by
the runtime's middleware (retryable → redelivery, anything else, a malformed event included →
dead-letter queue).
"""

from __future__ import annotations

from faststream.rabbit import RabbitBroker

from flywheel_contracts import LabelsRequestedV1
from flywheel_labeling.service import LabelRequestQueue
from flywheel_labeling.settings import SERVICE
from flywheel_runtime.topology import Topology


def register(broker: RabbitBroker, topology: Topology, queue: LabelRequestQueue) -> None:
    """Subscribe the needs-label queue to labels.requested."""

    @broker.subscriber(
        topology.queue(SERVICE, LabelsRequestedV1),
        topology.exchange_for(LabelsRequestedV1),
        title=f"{SERVICE}.{LabelsRequestedV1.routing_key()}:consume",
        description=(
            "Puts the requested images on the project's needs-label queue (one open entry per "
            "image: the highest score, the newest request); images labeled or dismissed in the "
            "project already are left out."
        ),
    )
    async def on_labels_requested(event: LabelsRequestedV1) -> None:
        """Reacts to labels.requested; opens or merges needs-label entries, emits nothing."""
        await queue.labels_requested(event)
