"""What drives the use cases: the broker subscriptions and the timer.

Handlers only hand the typed event to ``DataMonitor``; outgoing events leave through the outbox
in the same transaction, and errors are turned into acks by the runtime's middleware (retryable
→ redelivery, anything else, a malformed event included → dead-letter queue).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from faststream.rabbit import RabbitBroker

from flywheel_contracts import (
    DataQualityFailedV1,
    DriftDetectedV1,
    InferenceLoggedV1,
    LabelsRequestedV1,
    LabelsSavedV1,
    ProjectConfiguredV1,
    ThresholdReachedV1,
)
from flywheel_data_monitor.service import DataMonitor, DriftMonitor
from flywheel_data_monitor.settings import SERVICE
from flywheel_runtime.asyncapi import declare_publishes
from flywheel_runtime.topology import Topology

log = structlog.get_logger(__name__)


def register(
    broker: RabbitBroker, topology: Topology, monitor: DataMonitor, drift: DriftMonitor
) -> None:
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

    @broker.subscriber(
        topology.queue(SERVICE, InferenceLoggedV1),
        topology.exchange_for(InferenceLoggedV1),
        title=f"{SERVICE}.{InferenceLoggedV1.routing_key()}:consume",
        description=(
            "Keeps the drift features of each answered request (embedding, image statistics, "
            "predicted class) for the model line's drift checks."
        ),
    )
    async def on_inference_logged(event: InferenceLoggedV1) -> None:
        """Reacts to inference.logged; emits nothing (the drift timer does)."""
        await drift.inference_logged(event)

    declare_publishes(
        broker,
        topology,
        DriftDetectedV1,
        "A model line's recent inferences no longer look like its champion's training data; "
        "with the stored report's tests and what follows (a drift retrain, a labels request, "
        "or only this alert).",
    )
    declare_publishes(
        broker,
        topology,
        LabelsRequestedV1,
        "The most drifted recent images of a model line, for the labelers' needs-label queue: "
        "a drift retrain needs labels of the drifted slice.",
    )
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
    """Runs ``work`` every ``interval_s`` in the background (cooldown and max-wait of the
    retrain policy; drift checks)."""

    def __init__(
        self, work: Callable[[], Awaitable[Any]], interval_s: float, name: str = "timer"
    ) -> None:
        self._work = work
        self._interval_s = interval_s
        self._name = name
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        while True:
            try:
                await self._work()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # The next tick retries; a database outage must not end the timer for good.
                log.warning("timer tick failed; retrying", timer=self._name, error=repr(error))
            await asyncio.sleep(self._interval_s)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"data-monitor-{self._name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
