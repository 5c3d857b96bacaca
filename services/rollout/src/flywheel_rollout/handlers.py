"""What drives the use cases: the broker subscriptions and the driver loop.

Handlers only hand the typed event to ``Rollout``; outgoing events leave through the outbox in
the same transaction as the change they announce, and errors are turned into acks by the
runtime's middleware (retryable → redelivery, anything else, a malformed event included →
dead-letter queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
from faststream.rabbit import Channel, RabbitBroker

from flywheel_contracts import (
    CanaryVerdictV1,
    InferenceLoggedV1,
    LabelsSavedV1,
    ModelTrainedV1,
    ModelValidatedV1,
    RolloutStepV1,
    ThresholdReachedV1,
    TrainingFailedV1,
)
from flywheel_rollout.service import Rollout
from flywheel_rollout.settings import SERVICE
from flywheel_runtime.asyncapi import declare_publishes
from flywheel_runtime.topology import Topology

log = structlog.get_logger(__name__)


def register(
    broker: RabbitBroker, topology: Topology, rollout: Rollout, *, log_prefetch: int = 8
) -> None:
    """Subscribe the rollout to its events and document what it publishes; at most
    ``log_prefetch`` inference logs are handled at once."""

    @broker.subscriber(
        topology.queue(SERVICE, ModelValidatedV1),
        topology.exchange_for(ModelValidatedV1),
        title=f"{SERVICE}.{ModelValidatedV1.routing_key()}:consume",
        description=(
            "A passed version gets a canary on its model line (one at a time; later versions "
            "wait or supersede the waiting one; a frozen line refuses them). Every verdict is "
            "recorded on the line's timeline."
        ),
    )
    async def on_model_validated(event: ModelValidatedV1) -> None:
        """Reacts to model.validated; its canary later emits rollout.step and canary.verdict."""
        await rollout.model_validated(event)

    @broker.subscriber(
        topology.queue(SERVICE, InferenceLoggedV1),
        topology.exchange_for(InferenceLoggedV1),
        channel=Channel(prefetch_count=log_prefetch),
        title=f"{SERVICE}.{InferenceLoggedV1.routing_key()}:consume",
        description=(
            "Counts each request of a version in canary (errors, latency histogram, agreement "
            "on inputs both versions answered) in the open analysis interval."
        ),
    )
    async def on_inference_logged(event: InferenceLoggedV1) -> None:
        """Reacts to inference.logged; emits nothing."""
        await rollout.inference_logged(event)

    @broker.subscriber(
        topology.queue(SERVICE, LabelsSavedV1),
        topology.exchange_for(LabelsSavedV1),
        title=f"{SERVICE}.{LabelsSavedV1.routing_key()}:consume",
        description=(
            "Counts labelers' corrections of pre-fills per version in canary (model quality) "
            "and records the batch on the timeline."
        ),
    )
    async def on_labels_saved(event: LabelsSavedV1) -> None:
        """Reacts to labels.saved; emits nothing."""
        await rollout.labels_saved(event)

    @broker.subscriber(
        topology.queue(SERVICE, ThresholdReachedV1),
        topology.exchange_for(ThresholdReachedV1),
        title=f"{SERVICE}.{ThresholdReachedV1.routing_key()}:consume",
        description="Records the retrain trigger on the model line's timeline.",
    )
    async def on_threshold_reached(event: ThresholdReachedV1) -> None:
        """Reacts to threshold.reached; emits nothing."""
        await rollout.threshold_reached(event)

    @broker.subscriber(
        topology.queue(SERVICE, ModelTrainedV1),
        topology.exchange_for(ModelTrainedV1),
        title=f"{SERVICE}.{ModelTrainedV1.routing_key()}:consume",
        description="Records the trained version on the model line's timeline.",
    )
    async def on_model_trained(event: ModelTrainedV1) -> None:
        """Reacts to model.trained; emits nothing."""
        await rollout.model_trained(event)

    @broker.subscriber(
        topology.queue(SERVICE, TrainingFailedV1),
        topology.exchange_for(TrainingFailedV1),
        title=f"{SERVICE}.{TrainingFailedV1.routing_key()}:consume",
        description="Records the failed training run on the model line's timeline.",
    )
    async def on_training_failed(event: TrainingFailedV1) -> None:
        """Reacts to training.failed; emits nothing."""
        await rollout.training_failed(event)

    declare_publishes(
        broker,
        topology,
        RolloutStepV1,
        "The candidate's share of its line's traffic changed (a step, the promotion to 100 %, "
        "or the rollback to 0 %); `sequence` grows with each change. The current weights of "
        "every line are published again every `republish_s` with their original time and "
        "sequence, so a BFF that restarted catches up.",
    )
    declare_publishes(
        broker,
        topology,
        CanaryVerdictV1,
        "A canary ended: `promoted` (the registry alias `champion` already points at the "
        "candidate) or `rolled_back` (all traffic back to the champion), with the reasons and "
        "the last check's metrics.",
    )


class Driver:
    """Recovers serving at start, then runs ``Rollout.tick`` every ``tick_s`` (at once when
    something changed) and ``Rollout.republish`` every ``republish_s``."""

    def __init__(self, rollout: Rollout, tick_s: float, republish_s: float) -> None:
        self._rollout = rollout
        self._tick_s = tick_s
        self._republish_s = republish_s
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        recovered = False
        published: float | None = None
        while True:
            self._rollout.changed.clear()
            try:
                if not recovered:
                    await self._rollout.recover()
                    recovered = True
                await self._rollout.tick()
                if published is None or time.monotonic() - published >= self._republish_s:
                    await self._rollout.republish()
                    published = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # The next tick retries; a database outage must not end the canaries for good.
                log.warning("rollout tick failed; retrying", error=repr(error))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._tick_s):
                    await self._rollout.changed.wait()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="rollout-driver")

    async def stop(self) -> None:
        """Stops driving; canaries stay where they are and the next start resumes them."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
