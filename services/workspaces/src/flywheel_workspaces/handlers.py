"""What drives the use cases besides the API: the supervisor loop, and the events it publishes.

The service consumes no events. It publishes through the outbox (``add_event`` in the
transaction of each state change); ``register`` only documents those channels in the AsyncAPI
document.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from faststream.rabbit import RabbitBroker

from flywheel_contracts import WorkspaceExpiredV1, WorkspaceReadyV1, WorkspaceRequestedV1
from flywheel_runtime.asyncapi import declare_publishes
from flywheel_runtime.topology import Topology
from flywheel_workspaces.service import Workspaces
from flywheel_workspaces.settings import SERVICE

log = structlog.get_logger(__name__)


def register(broker: RabbitBroker, topology: Topology) -> None:
    """Document what the service publishes."""
    declare_publishes(
        broker,
        topology,
        WorkspaceRequestedV1,
        "An engineer asked for a GPU development environment (or started a stopped one "
        "again): its GPUs, whether it waits in its GPU kind's queue and at which place.",
    )
    declare_publishes(
        broker,
        topology,
        WorkspaceReadyV1,
        "An environment is ready to connect to: when it expires and how long it waited.",
    )
    declare_publishes(
        broker,
        topology,
        WorkspaceExpiredV1,
        "An environment was stopped because its TTL ran out or it stayed idle: its GPUs are "
        "free again, its home volume is kept; says how long it held them.",
    )


class Supervisor:
    """Runs ``Workspaces.tick`` every ``interval_s``, sooner when something changed (a
    request queued, GPUs freed)."""

    def __init__(self, workspaces: Workspaces, interval_s: float) -> None:
        self._workspaces = workspaces
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        while True:
            self._workspaces.changed.clear()
            try:
                await self._workspaces.tick()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # The next pass retries; a database outage must not end supervision for good.
                log.warning("supervisor pass failed; retrying", error=repr(error))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s):
                    await self._workspaces.changed.wait()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"{SERVICE}-supervisor")

    async def stop(self) -> None:
        """Stops supervising; environments keep running and the next start picks them up."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
