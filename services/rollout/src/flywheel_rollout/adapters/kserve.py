"""``Serving`` on KServe: one ``InferenceService`` per registered model, whose canary KServe runs.

KServe splits the traffic itself, between the revision that last had all of it (the champion)
and the newest one (the candidate, at ``canaryTrafficPercent``). So this adapter has two sides:

* ``serve`` / ``ready`` (the ``Serving`` port): ``serve`` puts the spec where the registry
  says it belongs (the ``challenger`` alias in canary beside the ``champion``, or the champion
  alone) and waits until KServe reports it ready; ``ready`` reads the revisions and the traffic
  from the status, so a check only counts once the split asked for is the split in force;
* ``apply_step``: the rollout's own ``rollout.step`` events (the same ones a BFF applies as
  weights) set the percentage: a step starts the canary or moves it, 100 % promotes (the
  canary percentage is removed), 0 % rolls back (0 % and the champion's ``storageUri`` back).
  Steps republished every ``republish_s`` carry their original time, so they repair drift
  without ever moving a service back to an older step.

Before a spec names a version's ``storageUri``, ``repositories`` (when given) writes that
version's Triton repository there: the registry is the source of truth, the bucket a cache.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

import structlog
from faststream.rabbit import RabbitBroker

from flywheel_clients.kubernetes import KubeObjects
from flywheel_clients.kubernetes_kserve import (
    INFERENCE_SERVICE,
    InferenceServiceSpec,
    KServeCanary,
    ServiceStatus,
    service_status,
)
from flywheel_contracts import RolloutStepV1
from flywheel_rollout.ports import Registry
from flywheel_rollout.settings import SERVICE, KServeSettings
from flywheel_runtime.errors import DependencyUnavailableError, InvalidInputError, NotFoundError
from flywheel_runtime.topology import Topology

log = structlog.get_logger(__name__)


class VersionRepositories(Protocol):
    """Writes a version's model repository where an InferenceService will read it."""

    async def publish(self, registered_model: str, version: str, storage_uri: str) -> None: ...


class KServeServing:
    """Serves registered versions through KServe InferenceServices, one per registered model."""

    def __init__(
        self,
        objects: KubeObjects,
        registry: Registry,
        settings: KServeSettings,
        *,
        champion_alias: str,
        challenger_alias: str,
        repositories: VersionRepositories | None = None,
    ) -> None:
        self._objects = objects
        self._registry = registry
        self._settings = settings
        self._repositories = repositories
        self._champion_alias = champion_alias
        self._challenger_alias = challenger_alias
        self._applied: dict[str, tuple[datetime, int]] = {}
        """Per InferenceService, the (time, sequence) of the newest step applied."""

    # --- names ----------------------------------------------------------------------------

    def service_name(self, registered_model: str) -> str:
        return self._settings.services.get(registered_model) or (
            self._settings.name_template.format(registered_model=registered_model)
        )

    def storage_uri(self, registered_model: str, version: str) -> str:
        return self._settings.storage_uri_template.format(
            registered_model=registered_model, version=version
        )

    def spec(self, registered_model: str, version: str) -> InferenceServiceSpec:
        """The InferenceService to create when there is none, serving ``version`` alone."""
        s = self._settings
        return InferenceServiceSpec(
            name=self.service_name(registered_model),
            namespace=s.namespace,
            storage_uri=self.storage_uri(registered_model, version),
            model_format=s.model_format,
            runtime=s.runtime,
            service_account=s.service_account,
            min_replicas=s.min_replicas,
            cpu=s.cpu,
            memory=s.memory,
            gpus=s.gpus,
            model_version=version,
            labels={"flywheel.dev/registered-model": registered_model},
        )

    def _canary(self, registered_model: str) -> KServeCanary:
        return KServeCanary(
            self._objects,
            namespace=self._settings.namespace,
            name=self.service_name(registered_model),
        )

    # --- Serving --------------------------------------------------------------------------

    async def serve(self, registered_model: str, versions: Sequence[str]) -> None:
        """Challenger (if asked for) in canary beside the champion, else the champion alone;
        returns once KServe reports them ready."""
        if not versions:
            return
        champion = await self._alias(registered_model, self._champion_alias)
        challenger = await self._alias(registered_model, self._challenger_alias)
        candidate = challenger if challenger in versions and challenger != champion else None
        others = [v for v in versions if v != candidate]
        if champion in others:
            stable: str = str(champion)
        elif others:
            stable = max(others, key=_version_order)
        else:
            # Only a candidate and nothing to compare it with: it serves alone.
            stable, candidate = str(candidate), None
        canary = self._canary(registered_model)
        status = await self._existing(canary, registered_model, stable)
        if candidate is not None:
            uri = await self._published(registered_model, candidate)
            if status.storage_uri != uri:
                # Loaded beside the champion without traffic; the first step gives it some.
                await canary.start(uri, 0, model_version=candidate)
        else:
            uri = await self._published(registered_model, stable)
            if status.storage_uri != uri:
                in_canary = status.canary_percent is not None
                if in_canary and status.previous_storage_uri == uri:
                    await canary.rollback(uri)
                else:
                    await canary.promote(uri)
        wanted = [stable] if candidate is None else [stable, candidate]
        await self._wait_ready(registered_model, wanted)

    async def ready(self, registered_model: str, version: str) -> bool:
        status = await self._status(self._canary(registered_model))
        if status is None or not status.ready:
            return False
        uri = self.storage_uri(registered_model, version)
        if status.storage_uri == uri:
            if not status.newest_ready:
                return False
            if status.canary_percent is None:
                return status.rolled_out
            # A split counts once KServe routes it (0 %: the champion serves everything).
            return status.canary_traffic == status.canary_percent
        if status.canary_percent is not None and status.previous_storage_uri == uri:
            # The champion, on the last rolled-out revision, beside a canary.
            return status.latest_rolledout_revision is not None
        return False

    # --- traffic --------------------------------------------------------------------------

    async def apply_step(self, event: RolloutStepV1) -> None:
        """Make the InferenceService route what the step says; older steps change nothing."""
        p = event.payload
        name = self.service_name(p.registered_model)
        mark = (event.occurred_at, p.sequence)
        newest = self._applied.get(name)
        if newest is not None and mark < newest:
            log.info("older rollout.step ignored", name=name, sequence=p.sequence)
            return
        canary = self._canary(p.registered_model)
        stable = p.champion_version or p.candidate_version
        status = await self._existing(canary, p.registered_model, stable)
        percent = p.traffic_percent
        # A rollback returns to the champion's repository, written when it was first served:
        # it must not wait on the registry or the bucket.
        candidate = (
            await self._published(p.registered_model, p.candidate_version)
            if percent > 0
            else self.storage_uri(p.registered_model, p.candidate_version)
        )
        if 0 < percent < 100:
            if status.storage_uri != candidate or status.canary_percent != percent:
                await canary.start(candidate, percent, model_version=p.candidate_version)
        elif percent == 100:
            if status.storage_uri != candidate or status.canary_percent is not None:
                await canary.promote(candidate)
        elif p.champion_version is not None:
            champion = self.storage_uri(p.registered_model, p.champion_version)
            if status.storage_uri != champion or status.canary_percent not in (None, 0):
                await canary.rollback(champion)
        self._applied[name] = mark
        log.info("canary traffic set", name=name, percent=percent, sequence=p.sequence)

    async def close(self) -> None:
        self._objects.close()

    # --- plumbing -------------------------------------------------------------------------

    async def _published(self, registered_model: str, version: str) -> str:
        """The version's ``storageUri``, its repository written there first."""
        uri = self.storage_uri(registered_model, version)
        if self._repositories is not None:
            await self._repositories.publish(registered_model, version, uri)
        return uri

    async def _alias(self, registered_model: str, alias: str) -> str | None:
        info = await self._registry.get_alias(registered_model, alias)
        return None if info is None else info.version

    @staticmethod
    async def _status(canary: KServeCanary) -> ServiceStatus | None:
        try:
            return await canary.status()
        except NotFoundError:
            return None

    async def _existing(
        self, canary: KServeCanary, registered_model: str, stable: str
    ) -> ServiceStatus:
        """The service's status; one that did not exist is created serving ``stable`` and
        waited for, since KServe rolls out whatever the first revision serves: a canary
        patched onto a service with no rolled-out revision yet would get all the traffic."""
        status = await self._status(canary)
        if status is not None:
            return status
        await self._published(registered_model, stable)
        await canary.deploy(self.spec(registered_model, stable))
        log.info("inference service created", name=canary.name, version=stable)
        await self._wait_ready(registered_model, [stable])
        return await canary.status()

    async def _wait_ready(self, registered_model: str, versions: Sequence[str]) -> None:
        """Until every version is ready; a service KServe reports failed is the version's fault
        (``InvalidInputError``), one still progressing at the deadline an outage (retried)."""
        deadline = time.monotonic() + self._settings.readiness_timeout_s
        while True:
            pending = [v for v in versions if not await self.ready(registered_model, v)]
            if not pending:
                return
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(self._settings.poll_s)
        name = self.service_name(registered_model)
        obj = await self._objects.get(INFERENCE_SERVICE, name, namespace=self._settings.namespace)
        failed = _failed_conditions(obj or {})
        details: dict[str, Any] = {"inference_service": name, "versions": pending}
        if failed:
            message = service_status(obj or {}).message or "; ".join(failed)
            raise InvalidInputError(
                f"KServe could not serve the versions: {message}",
                details=details | {"conditions": failed},
            )
        raise DependencyUnavailableError(
            "KServe did not make the versions ready in time", details=details
        )


def register_steps(broker: RabbitBroker, topology: Topology, serving: KServeServing) -> None:
    """Subscribe the KServe backend to the rollout's own weight changes (backend ``kserve``
    only, so the ``triton`` deployment's AsyncAPI document does not change)."""

    @broker.subscriber(
        topology.queue(SERVICE, RolloutStepV1),
        topology.exchange_for(RolloutStepV1),
        title=f"{SERVICE}.{RolloutStepV1.routing_key()}:consume",
        description=(
            "Backend kserve: sets the candidate's share on the model's InferenceService "
            "(canaryTrafficPercent; 100 % promotes, 0 % rolls back to the champion's "
            "storageUri). Steps older than one already applied change nothing."
        ),
    )
    async def on_rollout_step(event: RolloutStepV1) -> None:
        """Reacts to rollout.step; patches the InferenceService, emits nothing."""
        await serving.apply_step(event)


def _failed_conditions(obj: dict[str, Any]) -> list[str]:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return [
        f"{c.get('type')}: {c.get('message') or c.get('reason') or 'False'}"
        for c in conditions
        if c.get("status") == "False"
    ]


def _version_order(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (0, version)
