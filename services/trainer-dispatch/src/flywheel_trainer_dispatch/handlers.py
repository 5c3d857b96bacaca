"""What drives the use cases: the broker subscription and the supervisor loop.

The handler only hands the typed event to ``TrainerDispatch``; outgoing events leave through
the outbox when a run ends, and errors are turned into acks by the runtime's middleware
(retryable → redelivery, anything else, a malformed event included → dead-letter queue).
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from faststream.rabbit import RabbitBroker

from flywheel_contracts import ModelTrainedV1, ThresholdReachedV1, TrainingFailedV1
from flywheel_runtime.asyncapi import declare_publishes
from flywheel_runtime.topology import Topology
from flywheel_trainer_dispatch.service import TrainerDispatch
from flywheel_trainer_dispatch.settings import SERVICE

log = structlog.get_logger(__name__)


def register(broker: RabbitBroker, topology: Topology, dispatch: TrainerDispatch) -> None:
    """Subscribe the dispatcher to its event and document what it publishes."""

    @broker.subscriber(
        topology.queue(SERVICE, ThresholdReachedV1),
        topology.exchange_for(ThresholdReachedV1),
        title=f"{SERVICE}.{ThresholdReachedV1.routing_key()}:consume",
        description=(
            "Queues one training run per event for the model line: at most one run per line at "
            "a time, a newer trigger replacing the line's queued one, drift first."
        ),
    )
    async def on_threshold_reached(event: ThresholdReachedV1) -> None:
        """Reacts to threshold.reached; the run it queues later emits model.trained or
        training.failed."""
        await dispatch.threshold_reached(event)

    declare_publishes(
        broker,
        topology,
        ModelTrainedV1,
        "A training run registered a new model version in MLflow; carries the run, the "
        "version, the version it started from and the training metrics.",
    )
    declare_publishes(
        broker,
        topology,
        TrainingFailedV1,
        "A training run ended without a model version (error, killed, timed out, lost or "
        "cancelled); says why and whether running it again may succeed.",
    )


class Supervisor:
    """Recovers this instance's runs at start, then runs ``TrainerDispatch.tick`` every
    ``interval_s`` (sooner when a run was queued or cancelled)."""

    def __init__(self, dispatch: TrainerDispatch, interval_s: float) -> None:
        self._dispatch = dispatch
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        recovered = False
        while True:
            self._dispatch.changed.clear()
            try:
                if not recovered:
                    await self._dispatch.recover()
                    recovered = True
                await self._dispatch.tick()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # The next tick retries; a database outage must not end supervision for good.
                log.warning("supervisor tick failed; retrying", error=repr(error))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s):
                    await self._dispatch.changed.wait()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="trainer-dispatch-supervisor")

    async def stop(self) -> None:
        """Stops watching; the runs keep going and the next start re-attaches them."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
