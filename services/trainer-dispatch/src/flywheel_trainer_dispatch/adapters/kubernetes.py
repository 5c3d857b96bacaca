"""The ``kubernetes`` training backend: a run is a batch Job, or a PyTorchJob for several pods.

**Launch.** The placement policy (``placement.py``) picks a cluster and a Kueue flavor from the
queue delay each cluster's LocalQueue shows now, the run's burstability, budget and deadline
(from its priority); inputs and decision go into the run's handle and the object's
annotations. Then the excluded labels ConfigMap (if any) and the workload are created under
names derived from the run id: a create that meets an existing object (409) reads it and,
when it carries the run's id, uses it, so launching twice makes one object. The ConfigMap is
then owned by the workload, so it goes when the workload goes.

**Watch.** ``poll`` reads the workload (the service's tick is the polling loop, so no watch
stream is held): suspended or running is ``RUNNING``, with the pod's log tail refreshed every
``log_refresh_s``; ``Complete``/``Succeeded`` and ``Failed`` end it. The result is read from
MLflow (``mlflow_results.py``), where the job's registration leaves it; a failed run reports
the exit code of the container that failed and the tail of its log, headed by the reasons
Kubernetes gives. A workload gone without a trace (its TTL ran out while nobody watched) is
succeeded if MLflow has its version, else lost.

**Errors.** An API server or MLflow that does not answer never fails a run: ``poll`` and
``recover`` report a run they cannot see as still running (its timeout still applies), and a
``launch`` that cannot reach a cluster raises ``DependencyUnavailableError``, which leaves the
run starting; the next tick re-settles it (found in some cluster: re-attached; nowhere:
requeued). What retrying cannot fix (a refused manifest, no cluster the run may use) is a
``LaunchError``.

**Cancel** deletes the workload with foreground propagation and waits until it is gone.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Final, Protocol

import structlog

from flywheel_clients.kubernetes import (
    CONFIG_MAP,
    JOB,
    LOCAL_QUEUE,
    POD,
    PYTORCH_JOB,
    KubeObjects,
    KubernetesError,
    Resource,
)
from flywheel_runtime.errors import DependencyUnavailableError
from flywheel_runtime.settings import PlatformSettings
from flywheel_trainer_dispatch.adapters import k8s_manifests as manifests
from flywheel_trainer_dispatch.adapters.local import LOG_READ_LIMIT, TrainingOptions
from flywheel_trainer_dispatch.errors import LaunchError
from flywheel_trainer_dispatch.placement import (
    Placement,
    PlacementOption,
    PlacementRequest,
    place,
    queue_delay,
)
from flywheel_trainer_dispatch.ports import (
    Phase,
    RunHandle,
    RunSpec,
    RunStatus,
    TrainingOutput,
)
from flywheel_trainer_dispatch.settings import (
    ClusterSettings,
    FlavorSettings,
    KubernetesSettings,
)

log = structlog.get_logger(__name__)

BACKEND: Final = "kubernetes"
LOG_READ_LINES: Final = 50_000
"""Most lines of a pod's log the API returns (then at most ``LOG_READ_LIMIT`` bytes)."""
_WORKLOADS: Final = {JOB.kind: JOB, PYTORCH_JOB.kind: PYTORCH_JOB}
_GONE_POLL_S: Final = 0.5


class ResultSource(Protocol):
    """Where a finished run's result is read (MLflow in production)."""

    async def result(self, run_id: uuid.UUID) -> TrainingOutput | None:
        """The version the run registered; None when none. Raises
        ``DependencyUnavailableError`` when it cannot tell now."""
        ...

    def close(self) -> None: ...


# --- what the objects say (pure) ---------------------------------------------------------------


class WorkloadPhase(StrEnum):
    PENDING = "pending"
    """Created, suspended until Kueue admits it, or waiting for its pods."""
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class WorkloadState:
    phase: WorkloadPhase
    reason: str | None = None
    message: str | None = None


def workload_state(obj: Mapping[str, Any]) -> WorkloadState:
    """Where a Job or PyTorchJob stands, from its ``status.conditions``."""
    conditions = {
        str(c.get("type")): c
        for c in (obj.get("status") or {}).get("conditions") or []
        if c.get("status") == "True"
    }
    for kind, phase in (
        ("Failed", WorkloadPhase.FAILED),
        ("Complete", WorkloadPhase.SUCCEEDED),
        ("Succeeded", WorkloadPhase.SUCCEEDED),
    ):
        if kind in conditions:
            found = conditions[kind]
            return WorkloadState(phase, found.get("reason"), found.get("message"))
    if "Suspended" in conditions or (obj.get("spec") or {}).get("suspend") is True:
        return WorkloadState(WorkloadPhase.PENDING, "Suspended", "waiting for Kueue admission")
    status = obj.get("status") or {}
    replicas = status.get("replicaStatuses") or {}
    if (
        "Running" in conditions
        or status.get("active")
        or any(r.get("active") for r in replicas.values())
    ):
        return WorkloadState(WorkloadPhase.RUNNING)
    return WorkloadState(WorkloadPhase.PENDING)


@dataclass(frozen=True)
class PodEnd:
    """How a pod's training container ended, when it did."""

    pod: str
    container: str
    exit_code: int | None
    reason: str | None


def _created(pod: Mapping[str, Any]) -> str:
    return str(pod.get("metadata", {}).get("creationTimestamp") or "")


def _role_rank(pod: Mapping[str, Any]) -> int:
    role = (pod.get("metadata", {}).get("labels") or {}).get(manifests.ROLE_LABEL)
    return 0 if role in ("master", manifests.JOB_CONTAINER) else 1


def main_pod(pods: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The pod whose log is the run's log: the master (or the Job's pod), newest first."""
    if not pods:
        return None
    newest_first = sorted(pods, key=_created, reverse=True)
    return min(newest_first, key=_role_rank)


def pod_end(pod: Mapping[str, Any], container: str) -> PodEnd | None:
    """The termination of the pod's training container; None while it has not ended."""
    name = str(pod.get("metadata", {}).get("name", ""))
    status = pod.get("status") or {}
    for entry in status.get("containerStatuses") or []:
        if entry.get("name") != container:
            continue
        for state in (entry.get("state"), entry.get("lastState")):
            terminated = (state or {}).get("terminated")
            if terminated:
                code = terminated.get("exitCode")
                return PodEnd(
                    name,
                    container,
                    int(code) if code is not None else None,
                    terminated.get("reason"),
                )
    if status.get("phase") == "Failed":
        # Evicted or preempted before the container ended: no exit code to tell.
        return PodEnd(name, container, None, status.get("reason") or "Failed")
    return None


def failed_pod(pods: Sequence[Mapping[str, Any]], container: str) -> PodEnd | None:
    """The pod that failed the run: a non-zero (or unknown) exit, the master's first."""
    ends = []
    for pod in sorted(pods, key=lambda p: (_role_rank(p), _created(p))):
        end = pod_end(pod, container)
        if end is not None and end.exit_code != 0:
            ends.append(end)
    return ends[0] if ends else None


# --- the backend ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cluster:
    settings: ClusterSettings
    objects: KubeObjects
    namespace: str
    queue_name: str | None

    @property
    def name(self) -> str:
        return self.settings.name

    def flavor(self, name: str) -> FlavorSettings:
        return next(f for f in self.settings.flavors if f.name == name)


@dataclass(frozen=True)
class _Ref:
    """Where a launched run's workload is: read from (and written to) its handle."""

    cluster: str
    namespace: str
    resource: Resource
    name: str

    @classmethod
    def of(cls, handle: RunHandle) -> _Ref | None:
        details = handle.details
        resource = _WORKLOADS.get(str(details.get("kind")))
        if resource is None or not details.get("cluster") or not details.get("namespace"):
            return None
        return cls(
            str(details["cluster"]),
            str(details["namespace"]),
            resource,
            str(details.get("name") or manifests.object_name(handle.run_id)),
        )


class KubernetesBackend:
    """Runs training as Kubernetes workloads; see the module docstring."""

    name = BACKEND

    def __init__(
        self,
        settings: KubernetesSettings,
        options: TrainingOptions,
        platform: PlatformSettings,
        results: ResultSource,
        *,
        timeout_s: float,
        kill_grace_s: float = 5.0,
        tail_lines: int = 40,
        objects: Mapping[str, KubeObjects] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``objects`` replaces the API access per cluster name (tests)."""
        self._settings = settings
        self._options = options
        self._platform = platform
        self._results = results
        self._timeout_s = timeout_s
        self._kill_grace_s = kill_grace_s
        self._tail_lines = tail_lines
        self._clock = clock
        self._clusters: dict[str, _Cluster] = {}
        for cluster in settings.resolved_clusters():
            access = (objects or {}).get(cluster.name) or KubeObjects(cluster.connection)
            self._clusters[cluster.name] = _Cluster(
                cluster,
                access,
                cluster.namespace or settings.namespace,
                cluster.queue_name or settings.queue_name,
            )
        self._tails: dict[uuid.UUID, tuple[float, str]] = {}

    async def aclose(self) -> None:
        for cluster in self._clusters.values():
            cluster.objects.close()
        self._results.close()

    # --- launch ---------------------------------------------------------------------------

    async def launch(self, spec: RunSpec) -> RunHandle:
        decision, record = await self._place(spec)
        cluster = self._clusters[decision.cluster]
        run_class = self._settings.placement.for_priority(spec.priority)
        options = self._options.for_run(spec)
        target = self._target(
            cluster,
            cluster.flavor(decision.flavor),
            priority_class=run_class.priority_class or self._settings.priority_class,
            nproc_per_node=options.nproc_per_node,
        )
        try:
            built = manifests.run_objects(
                spec,
                target,
                options,
                self._platform,
                placement={
                    "cluster": decision.cluster,
                    "flavor": decision.flavor,
                    "reason": decision.reason,
                },
            )
        except manifests.ManifestError as error:
            raise LaunchError(str(error), details={"run_id": str(spec.run_id)}) from error
        name = manifests.object_name(spec.run_id)
        config_created = False
        try:
            if built.config_map is not None:
                _, config_created = await cluster.objects.create_or_get(
                    CONFIG_MAP, built.config_map, namespace=cluster.namespace
                )
            workload, created = await cluster.objects.create_or_get(
                built.resource, built.workload, namespace=cluster.namespace
            )
        except KubernetesError as error:
            if config_created:
                await self._delete_config_map(cluster, name)
            raise LaunchError(error.message, details={"run_id": str(spec.run_id)}) from error
        if not _carries(workload, spec.run_id):
            if config_created:
                await self._delete_config_map(cluster, name)
            raise LaunchError(
                f"{built.resource.kind} {cluster.namespace}/{name} exists and is not this run's",
                details={"run_id": str(spec.run_id), "cluster": cluster.name},
            )
        if built.config_map is not None:
            await self._adopt(cluster, name, workload)
        log.info(
            "training launched" if created else "training found already launched",
            run_id=str(spec.run_id),
            cluster=cluster.name,
            kind=built.resource.kind,
            name=name,
            flavor=decision.flavor,
        )
        return RunHandle(
            backend=BACKEND,
            run_id=spec.run_id,
            command=built.command,
            details={
                "cluster": cluster.name,
                "namespace": cluster.namespace,
                "kind": built.resource.kind,
                "name": name,
                "uid": workload.get("metadata", {}).get("uid"),
                "config_map": name if built.config_map is not None else None,
                "placement": record,
            },
        )

    async def _place(self, spec: RunSpec) -> tuple[Placement, dict[str, Any]]:
        """Measure every cluster, decide, and return the decision with its record."""
        placement = self._settings.placement
        run_class = placement.for_priority(spec.priority)
        request = PlacementRequest(
            burstable=run_class.burstable,
            budget=run_class.budget,
            deadline_s=run_class.deadline_s,
            expected_run_s=placement.expected_run_s,
            burst_after_s=placement.burst_after_s,
        )
        measured = await asyncio.gather(*(self._measure(c) for c in self._clusters.values()))
        options = [option for cluster_options, _ in measured for option in cluster_options]
        unreachable = any(transient for _, transient in measured)
        decision = place(request, options)
        record = {
            "inputs": {
                "priority": spec.priority.value if spec.priority else None,
                "request": request.model_dump(mode="json"),
                "options": [o.model_dump(mode="json") for o in options],
            },
            "decision": decision.model_dump(mode="json") if decision else None,
        }
        if decision is None:
            why = "; ".join(
                f"{o.cluster}/{o.flavor}: {o.unavailable or 'not allowed for this run'}"
                for o in options
            )
            if unreachable:
                raise DependencyUnavailableError(
                    f"no cluster can take the run now ({why})",
                    details={"run_id": str(spec.run_id)},
                )
            raise LaunchError(
                f"no cluster may take the run ({why})", details={"run_id": str(spec.run_id)}
            )
        log.info("training placed", run_id=str(spec.run_id), **decision.model_dump(mode="json"))
        return decision, record

    async def _measure(self, cluster: _Cluster) -> tuple[list[PlacementOption], bool]:
        """One option per flavor of the cluster; True when the cluster did not answer."""
        delay: float | None = None
        unavailable: str | None = None
        transient = False
        if cluster.queue_name is None:
            delay = 0.0  # no Kueue queue: nothing to wait for that we can see
        else:
            local_queue = replace(
                LOCAL_QUEUE, api_version=f"kueue.x-k8s.io/{self._settings.kueue_version}"
            )
            try:
                queue = await cluster.objects.get(
                    local_queue, cluster.queue_name, namespace=cluster.namespace
                )
            except DependencyUnavailableError:
                unavailable, transient = "the API server did not answer", True
            except KubernetesError as error:
                unavailable = error.message
            else:
                if queue is None:
                    unavailable = f"LocalQueue {cluster.namespace}/{cluster.queue_name} not found"
                else:
                    status = queue.get("status") or {}
                    delay = queue_delay(
                        int(status.get("pendingWorkloads") or 0),
                        int(status.get("admittedWorkloads") or 0),
                        cluster.settings.slots,
                        self._settings.placement.expected_run_s,
                    )
        options = [
            PlacementOption(
                cluster=cluster.name,
                flavor=flavor.name,
                pool=cluster.settings.pool,
                cost=flavor.cost,
                queue_delay_s=delay,
                unavailable=unavailable,
            )
            for flavor in cluster.settings.flavors
        ]
        return options, transient

    def _target(
        self,
        cluster: _Cluster,
        flavor: FlavorSettings,
        *,
        priority_class: str | None,
        nproc_per_node: int,
    ) -> manifests.PodTarget:
        settings = self._settings
        gpu = flavor.gpu or settings.gpu
        resource = gpu.resource()
        secrets = settings.secrets
        return manifests.PodTarget(
            namespace=cluster.namespace,
            image=settings.image,
            image_pull_policy=settings.image_pull_policy,
            service_account=settings.service_account,
            queue_name=cluster.queue_name,
            priority_class=priority_class,
            workers=settings.workers,
            nproc_per_node=nproc_per_node,
            cpu=settings.cpu,
            memory=settings.memory,
            gpu_resource=resource,
            gpu_count=gpu.count if resource else 0,
            node_selector=dict(flavor.node_labels),
            env={**settings.env, **cluster.settings.env},
            secret_env={
                "FLYWHEEL_S3_ACCESS_KEY": (secrets.s3_secret, secrets.s3_access_key_key),
                "FLYWHEEL_S3_SECRET_KEY": (secrets.s3_secret, secrets.s3_secret_key_key),
            },
            env_from_secrets=tuple(secrets.env_from),
            labels=dict(settings.labels),
            ttl_after_finished_s=settings.ttl_after_finished_s,
            backoff_limit=settings.backoff_limit,
            # A safety net should this service be gone: its own timeout fires first.
            active_deadline_s=math.ceil(self._timeout_s),
            termination_grace_s=max(1, math.ceil(self._kill_grace_s)),
        )

    async def _adopt(self, cluster: _Cluster, name: str, workload: Mapping[str, Any]) -> None:
        """Make the ConfigMap the workload's, so it is deleted with it; best effort, since
        the end of the run deletes it anyway."""
        try:
            await cluster.objects.patch(
                CONFIG_MAP,
                name,
                {"metadata": {"ownerReferences": [manifests.owner_reference(workload)]}},
                namespace=cluster.namespace,
            )
        except (DependencyUnavailableError, KubernetesError) as error:
            log.warning("could not hand the ConfigMap to its workload", name=name, error=str(error))

    # --- watch ----------------------------------------------------------------------------

    async def poll(self, handle: RunHandle) -> RunStatus:
        ref = self._ref(handle)
        if ref is None:
            return RunStatus(phase=Phase.LOST, handle=handle)
        try:
            obj = await self._cluster(ref).objects.get(
                ref.resource, ref.name, namespace=ref.namespace
            )
            return await self._status(ref, handle, obj)
        except (DependencyUnavailableError, KubernetesError) as error:
            # Not the run's failure: keep watching; its timeout still bounds it.
            log.warning("cannot see the run now", run_id=str(handle.run_id), error=error.message)
            return self._still_running(handle)

    async def recover(self, handle: RunHandle) -> RunStatus:
        ref = self._ref(handle)
        if ref is None:
            return await self._recover_unsaved(handle)
        try:
            obj = await self._cluster(ref).objects.get(
                ref.resource, ref.name, namespace=ref.namespace
            )
            return await self._status(ref, handle, obj)
        except (DependencyUnavailableError, KubernetesError) as error:
            # Watch it again rather than hold up the whole recovery: poll settles it later.
            log.warning("cannot see the run now", run_id=str(handle.run_id), error=error.message)
            return self._still_running(handle)

    async def _recover_unsaved(self, handle: RunHandle) -> RunStatus:
        """A run chosen to start whose handle was never saved: launched or not, and where?"""
        found, unseen = await self._find(handle.run_id)
        if found is None:
            if unseen:
                log.warning(
                    "run not found, but some clusters did not answer",
                    run_id=str(handle.run_id),
                    clusters=unseen,
                )
            try:
                output = await self._results.result(handle.run_id)
            except DependencyUnavailableError:
                output = None
            if output is not None:
                return RunStatus(phase=Phase.SUCCEEDED, output=output, handle=handle)
            return RunStatus(phase=Phase.NOT_STARTED, handle=handle)
        ref, obj = found
        handle = handle.model_copy(
            update={
                "details": {
                    **handle.details,
                    "cluster": ref.cluster,
                    "namespace": ref.namespace,
                    "kind": ref.resource.kind,
                    "name": ref.name,
                    "uid": obj.get("metadata", {}).get("uid"),
                    "config_map": ref.name,
                }
            }
        )
        try:
            return await self._status(ref, handle, obj)
        except DependencyUnavailableError:
            return self._still_running(handle)

    async def cancel(self, handle: RunHandle) -> None:
        ref = self._ref(handle)
        if ref is None:
            return
        objects = self._cluster(ref).objects
        try:
            await objects.delete(ref.resource, ref.name, namespace=ref.namespace)
            deadline = self._clock() + self._settings.cancel_wait_s
            while await objects.get(ref.resource, ref.name, namespace=ref.namespace) is not None:
                if self._clock() >= deadline:
                    log.error("training outlived its deletion", run_id=str(handle.run_id))
                    break
                await asyncio.sleep(_GONE_POLL_S)
        except KubernetesError as error:
            # Refused for good (RBAC, say): retrying cannot help; say so loudly and move on.
            log.error(
                "could not delete the training", run_id=str(handle.run_id), error=error.message
            )
        await self._clean_up(ref, handle)

    async def read_log(self, handle: RunHandle) -> str | None:
        ref = self._ref(handle)
        if ref is None:
            return None
        try:
            pod = main_pod(await self._pods(ref, handle))
            if pod is None:
                return None
            text = await self._cluster(ref).objects.read_log(
                str(pod["metadata"]["name"]),
                namespace=ref.namespace,
                container=_container(ref),
                tail_lines=LOG_READ_LINES,
            )
        except (DependencyUnavailableError, KubernetesError):
            return None
        if text is None:
            return None
        data = text.encode()
        return data[-LOG_READ_LIMIT:].decode("utf-8", errors="replace")

    # --- helpers --------------------------------------------------------------------------

    def _ref(self, handle: RunHandle) -> _Ref | None:
        """Where the handle says the run is; None when it does not say, or names a cluster
        the settings no longer list."""
        ref = _Ref.of(handle)
        if ref is not None and ref.cluster not in self._clusters:
            log.error(
                "the run is on an unknown cluster", run_id=str(handle.run_id), cluster=ref.cluster
            )
            return None
        return ref

    def _cluster(self, ref: _Ref) -> _Cluster:
        return self._clusters[ref.cluster]

    async def _find(
        self, run_id: uuid.UUID
    ) -> tuple[tuple[_Ref, dict[str, Any]] | None, list[str]]:
        """The run's workload in any cluster, and the clusters that could not be searched."""
        name = manifests.object_name(run_id)
        unseen: list[str] = []
        for cluster in self._clusters.values():
            for resource in _WORKLOADS.values():
                try:
                    obj = await cluster.objects.get(resource, name, namespace=cluster.namespace)
                except (DependencyUnavailableError, KubernetesError):
                    unseen.append(cluster.name)
                    break
                if obj is not None and _carries(obj, run_id):
                    return (_Ref(cluster.name, cluster.namespace, resource, name), obj), unseen
        return None, unseen

    async def _status(
        self, ref: _Ref, handle: RunHandle, obj: Mapping[str, Any] | None
    ) -> RunStatus:
        """The run's status from its workload (None: the workload is gone)."""
        if obj is None or not _carries(obj, handle.run_id):
            output = await self._results.result(handle.run_id)
            await self._clean_up(ref, handle)
            tail = self._tails.pop(handle.run_id, (0.0, ""))[1]
            if output is not None:
                return RunStatus(phase=Phase.SUCCEEDED, output=output, log_tail=tail, handle=handle)
            return RunStatus(phase=Phase.LOST, log_tail=tail, handle=handle)
        state = workload_state(obj)
        if state.phase in (WorkloadPhase.PENDING, WorkloadPhase.RUNNING):
            return RunStatus(
                phase=Phase.RUNNING, log_tail=await self._running_tail(ref, handle), handle=handle
            )
        output = await self._results.result(handle.run_id)
        pods = await self._pods(ref, handle)
        if state.phase is WorkloadPhase.SUCCEEDED and output is not None:
            tail = await self._tail(ref, main_pod(pods))
            await self._clean_up(ref, handle)
            return RunStatus(
                phase=Phase.SUCCEEDED, exit_code=0, output=output, log_tail=tail, handle=handle
            )
        if output is not None:
            # The version is registered: announce it even if a pod failed on the way out.
            await self._clean_up(ref, handle)
            tail = await self._tail(ref, main_pod(pods))
            return RunStatus(phase=Phase.SUCCEEDED, output=output, log_tail=tail, handle=handle)
        if state.phase is WorkloadPhase.SUCCEEDED:
            tail = await self._tail(ref, main_pod(pods))
            await self._clean_up(ref, handle)
            return RunStatus(phase=Phase.FAILED, exit_code=0, log_tail=tail, handle=handle)
        end = failed_pod(pods, _container(ref))
        header = [f"# {ref.resource.kind} {ref.name} failed: {state.reason}: {state.message}"]
        pod = main_pod(pods)
        if end is not None:
            header.append(
                f"# pod {end.pod}, container {end.container}: {end.reason} "
                f"(exit code {end.exit_code})"
            )
            pod = next((p for p in pods if p["metadata"]["name"] == end.pod), pod)
        tail = "\n".join([*header, await self._tail(ref, pod)]).rstrip("\n")
        await self._clean_up(ref, handle)
        return RunStatus(
            phase=Phase.FAILED,
            exit_code=end.exit_code if end is not None else None,
            log_tail=tail,
            handle=handle,
        )

    async def _pods(self, ref: _Ref, handle: RunHandle) -> list[dict[str, Any]]:
        """The run's pods; none when the API refuses to list them (logs are a nicety)."""
        try:
            return await self._cluster(ref).objects.list_objects(
                POD,
                namespace=ref.namespace,
                label_selector=f"{manifests.RUN_ID_LABEL}={handle.run_id}",
            )
        except KubernetesError as error:
            log.warning(
                "cannot list the run's pods", run_id=str(handle.run_id), error=error.message
            )
            return []

    async def _tail(self, ref: _Ref, pod: Mapping[str, Any] | None) -> str:
        """The last lines of a pod's training container log ("" when there is none)."""
        if pod is None:
            return ""
        try:
            text = await self._cluster(ref).objects.read_log(
                str(pod["metadata"]["name"]),
                namespace=ref.namespace,
                container=_container(ref),
                tail_lines=self._tail_lines,
            )
        except KubernetesError as error:
            # A pod that never started has no log to give (400): say why instead.
            return f"# no log: {error.message}"
        return (text or "").rstrip("\n")

    async def _running_tail(self, ref: _Ref, handle: RunHandle) -> str:
        """The log tail of a running run, read again every ``log_refresh_s`` at most."""
        now = self._clock()
        read_at, tail = self._tails.get(handle.run_id, (None, ""))
        if read_at is not None and now - read_at < self._settings.log_refresh_s:
            return tail
        tail = await self._tail(ref, main_pod(await self._pods(ref, handle)))
        self._tails[handle.run_id] = (now, tail)
        return tail

    def _still_running(self, handle: RunHandle) -> RunStatus:
        tail = self._tails.get(handle.run_id, (0.0, ""))[1]
        return RunStatus(phase=Phase.RUNNING, log_tail=tail, handle=handle)

    async def _clean_up(self, ref: _Ref, handle: RunHandle) -> None:
        """Delete the run's ConfigMap (its owner reference may never have been set)."""
        self._tails.pop(handle.run_id, None)
        name = handle.details.get("config_map")
        if name:
            await self._delete_config_map(self._cluster(ref), str(name))

    async def _delete_config_map(self, cluster: _Cluster, name: str) -> None:
        """Best effort: a ConfigMap left behind holds label ids only, and its owner (when
        set) takes it along."""
        try:
            await cluster.objects.delete(
                CONFIG_MAP, name, namespace=cluster.namespace, propagation="Background"
            )
        except (DependencyUnavailableError, KubernetesError) as error:
            log.warning("could not delete the run's ConfigMap", name=name, error=str(error))


def _carries(obj: Mapping[str, Any], run_id: uuid.UUID) -> bool:
    """Whether an object is the run's (a name is only a hint; the label says it)."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return labels.get(manifests.RUN_ID_LABEL) == str(run_id)


def _container(ref: _Ref) -> str:
    return manifests.PYTORCH_CONTAINER if ref.resource is PYTORCH_JOB else manifests.JOB_CONTAINER
