"""The broker subscriptions: routing events in, to every replica; inference.logged out.

Each replica must see every routing event, so each binds its own exclusive, auto-delete
(classic, non-quorum) queues to the events exchange: a shared queue would hand each event to one
replica only. The queues live as long as the replica's connection; a replica that starts later
takes the weights stored by the others (``Routing.restore``). The handlers only hand the typed
event to ``Routing``, which never raises for a stale or repeated event.

An event a replica cannot handle (unreadable, or failing past the delivery limit) goes to the
subscription's one durable dead-letter queue, ``inference-bff.<event>.dlq``, shared by every
replica and outliving them (``Topology.replica_queue`` says why).
"""

from __future__ import annotations

from faststream.rabbit import RabbitBroker

from flywheel_contracts import (
    CanaryVerdictV1,
    InferenceLoggedV1,
    ProjectConfiguredV1,
    RolloutStepV1,
)
from flywheel_inference_bff.service import Routing
from flywheel_inference_bff.settings import SERVICE
from flywheel_runtime.asyncapi import declare_publishes
from flywheel_runtime.topology import Topology


def register(broker: RabbitBroker, topology: Topology, routing: Routing, replica: str) -> None:
    """Subscribe this replica to the routing events and document what the BFF publishes."""

    @broker.subscriber(
        topology.replica_queue(SERVICE, RolloutStepV1, replica),
        topology.exchange_for(RolloutStepV1),
        title=f"{SERVICE}.{RolloutStepV1.routing_key()}:consume",
        description=(
            "Canary weights of a model line: the candidate gets traffic_percent, the champion "
            "the rest; newest (occurred_at, sequence) wins. One queue per replica."
        ),
    )
    async def on_rollout_step(event: RolloutStepV1) -> None:
        """Reacts to rollout.step; emits nothing (routing changes for the next request)."""
        await routing.rollout_step(event)

    @broker.subscriber(
        topology.replica_queue(SERVICE, CanaryVerdictV1, replica),
        topology.exchange_for(CanaryVerdictV1),
        title=f"{SERVICE}.{CanaryVerdictV1.routing_key()}:consume",
        description=(
            "End of a canary: promoted sends 100 % to the candidate, rolled_back 100 % to the "
            "champion. One queue per replica."
        ),
    )
    async def on_canary_verdict(event: CanaryVerdictV1) -> None:
        """Reacts to canary.verdict; emits nothing."""
        await routing.canary_verdict(event)

    @broker.subscriber(
        topology.replica_queue(SERVICE, ProjectConfiguredV1, replica),
        topology.exchange_for(ProjectConfiguredV1),
        title=f"{SERVICE}.{ProjectConfiguredV1.routing_key()}:consume",
        description="The project a model line belongs to, named in its inference logs.",
    )
    async def on_project_configured(event: ProjectConfiguredV1) -> None:
        """Reacts to project.configured; emits nothing."""
        await routing.project_configured(event)

    declare_publishes(
        broker,
        topology,
        InferenceLoggedV1,
        "One per prediction, ok or error, online or batch (request_id is the prediction id "
        "returned to the client). Fire-and-forget through a bounded buffer: under a broker "
        "outage logs are dropped and counted in flywheel_bff_inference_logs_dropped_total.",
    )
