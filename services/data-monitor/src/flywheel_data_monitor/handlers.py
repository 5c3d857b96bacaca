"""What drives the use cases: the broker subscriptions and the timer.

Handlers only hand the typed event to ``DataMonitor``; outgoing events leave through the outbox
in the same transaction, and errors are turned into acks by the runtime's middleware (retryable
→ redelivery, anything else, a malformed event included → dead-letter queue).
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from faststream.rabbit import RabbitBroker

from flywheel_contracts import (
    DataQualityFailedV1,
    LabelsSavedV1,
    ProjectConfiguredV1,
    ThresholdReachedV1,
)
from flywheel_data_monitor.service import DataMonitor
from flywheel_data_monitor.settings import SERVICE
from flywheel_runtime.asyncapi import declare_publishes
from flywheel_runtime.topology import Topology

log = structlog.get_logger(__name__)


def register(broker: RabbitBroker, topology: Topology, monitor: DataMonitor) -> None:
    """Subscribe the monitor to its events and document what it publishes."""

    @broker.subscriber(
        topology.queue(SERVICE, LabelsSavedV1),
        topology.exchange_for(LabelsSavedV1),
        title=f"{SERVICE}.{LabelsSavedV1.routing_key()}:consume",
        description=(
            "Checks each batch of labels (class shift, duplicates, labeler anomalies) and counts "
            "it towards the project's next retrain, or quarantines it."
        ),
    )
    async def on_labels_saved(event: LabelsSavedV1) -> None:
        """Reacts to labels.saved; may emit threshold.reached and data.quality_failed."""
        await monitor.labels_saved(event)

    @broker.subscriber(
        topology.queue(SERVICE, ProjectConfiguredV1),
        topology.exchange_for(ProjectConfiguredV1),
        title=f"{SERVICE}.{ProjectConfiguredV1.routing_key()}:consume",
        description=(
            "Keeps the project's model line, classes and retrain policy (newest revision wins)."
        ),
    )
    async def on_project_configured(event: ProjectConfiguredV1) -> None:
        """Reacts to project.configured; may emit threshold.reached under a lower count."""
        await monitor.project_configured(event)

    declare_publishes(
        broker,
        topology,
        ThresholdReachedV1,
        "A project has enough new labels (or waited long enough) to retrain its model line; "
        "emitted once per retrain, with the stored decision and the quarantined labels to leave "
        "out.",
    )
    declare_publishes(
        broker,
        topology,
        DataQualityFailedV1,
        "A batch of labels failed a data-quality check and was quarantined: it does not count "
        "towards a retrain and its labels are excluded from every later one.",
    )


class Ticker:
    """Runs ``DataMonitor.tick`` every ``interval_s`` in the background (cooldown, max-wait)."""

    def __init__(self, monitor: DataMonitor, interval_s: float) -> None:
        self._monitor = monitor
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        while True:
            try:
                await self._monitor.tick()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # The next tick retries; a database outage must not end the timer for good.
                log.warning("timer tick failed; retrying", error=repr(error))
            await asyncio.sleep(self._interval_s)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="data-monitor-timer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
