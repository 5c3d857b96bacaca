"""The ``kubernetes`` workspace backend: each environment is a Pod, its home-directory PVC, a
Service, a NetworkPolicy and, behind an ingress host, the Istio VirtualService that routes its
IDE path (``k8s_manifests.py``), reached through the official client.

**Create** makes the claim (unless it is there from an earlier start), then the NetworkPolicy,
the Service and the route, then the Pod, so the Pod never runs unisolated. Names come from the
workspace id: a create that meets an existing object (409) reads it and, when it carries the
workspace's id, uses it, so a create repeated after a crash makes nothing twice. A Pod of the
same name that is still terminating (the environment was just stopped) is
``DependencyUnavailableError``: try again once it is gone.

**Status** reads the Pod: running and Ready is ``ready``; pending (Kueue admission, scheduling,
image pull) or running but not Ready yet is ``pending``; failed or ended, or a container that
can never start, is ``failed``; no Pod, or one being deleted, is ``gone``. The last activity is
the annotation the IDE's sidecar keeps on its Pod; without one it is unknown. Once the
environment has an expiry, the Pod's ``flywheel.dev/expires-at`` label is brought in line with
it (best effort: it only informs operators).

**Stop** deletes the Pod, the route, the Service and the NetworkPolicy and keeps the claim;
**delete** also deletes the claim. Both are idempotent (an object already gone is fine) and do
not wait for the Pod to end: ``status`` reports ``gone`` once it has.

**Errors** are the client's: an API server that does not answer is
``DependencyUnavailableError`` (retryable), a refusal is ``KubernetesError`` with the API
server's reason, a name taken by something that is not this environment's is
``ConflictError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

import structlog

from flywheel_clients.kubernetes import POD, KubeObjects, Resource
from flywheel_runtime.errors import ConflictError, DependencyUnavailableError, FlywheelError
from flywheel_workspaces.adapters import k8s_manifests as manifests
from flywheel_workspaces.adapters.k8s_manifests import KubernetesOptions
from flywheel_workspaces.ports import BackendPhase, BackendStatus, Workspace

log = structlog.get_logger(__name__)

BACKEND: Final = "kubernetes"
_FATAL_WAITING: Final = frozenset(
    {"InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError"}
)
"""Container waiting reasons no retry by the kubelet can clear."""


# --- what the Pod says (pure) ------------------------------------------------------------------


def carries(obj: Mapping[str, Any], workspace: Workspace) -> bool:
    """Whether an object is this environment's (a name is only a hint; the label says it)."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return labels.get(manifests.WORKSPACE_ID_LABEL) == str(workspace.workspace_id)


def last_activity(pod: Mapping[str, Any]) -> datetime | None:
    """The sidecar's last sign of use (RFC 3339 or epoch seconds); None when absent or
    unreadable."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    raw = annotations.get(manifests.LAST_ACTIVITY_ANNOTATION)
    if not isinstance(raw, str) or not raw.strip():
        return None
    text = raw.strip()
    try:
        if text.replace(".", "", 1).isdigit():
            return datetime.fromtimestamp(float(text), UTC)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _conditions(pod: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    status = pod.get("status") or {}
    return {str(c.get("type")): c for c in status.get("conditions") or []}


def _waiting(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first waiting container's reason and message."""
    status = pod.get("status") or {}
    for entry in [
        *(status.get("initContainerStatuses") or []),
        *(status.get("containerStatuses") or []),
    ]:
        waiting = (entry.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason"):
            return str(waiting["reason"]), str(waiting.get("message") or "")
    return None


def _pending_message(pod: Mapping[str, Any]) -> str | None:
    scheduled = _conditions(pod).get("PodScheduled") or {}
    if scheduled.get("status") == "False":
        if scheduled.get("reason") == "SchedulingGated":
            return "waiting for admission to the development queue"
        return _join(scheduled.get("reason"), scheduled.get("message")) or "not scheduled yet"
    waiting = _waiting(pod)
    if waiting is not None:
        return _join(*waiting)
    return None


def _join(reason: object, message: object) -> str | None:
    parts = [str(p) for p in (reason, message) if p]
    return ": ".join(parts) or None


def pod_status(
    pod: Mapping[str, Any] | None, workspace: Workspace, options: KubernetesOptions
) -> BackendStatus:
    """Where the environment stands, from its Pod (None: there is none)."""
    if pod is None or not carries(pod, workspace):
        return BackendStatus(phase=BackendPhase.GONE, message="the environment's pod is gone")
    activity = last_activity(pod)
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return BackendStatus(
            phase=BackendPhase.GONE,
            last_activity_at=activity,
            message="the environment's pod is being deleted",
        )
    status = pod.get("status") or {}
    phase = status.get("phase")
    if phase in ("Failed", "Succeeded"):
        # Evicted, preempted, or its container ended: either way the session is over.
        message = _join(status.get("reason"), status.get("message")) or f"the pod {phase.lower()}"
        return BackendStatus(phase=BackendPhase.FAILED, last_activity_at=activity, message=message)
    waiting = _waiting(pod)
    if waiting is not None and waiting[0] in _FATAL_WAITING:
        return BackendStatus(
            phase=BackendPhase.FAILED, last_activity_at=activity, message=_join(*waiting)
        )
    ready = (_conditions(pod).get("Ready") or {}).get("status") == "True"
    if phase == "Running" and ready:
        return BackendStatus(
            phase=BackendPhase.READY,
            connection=manifests.connection(workspace, options),
            last_activity_at=activity,
        )
    return BackendStatus(
        phase=BackendPhase.PENDING, last_activity_at=activity, message=_pending_message(pod)
    )


# --- the backend -------------------------------------------------------------------------------


class KubernetesBackend:
    """Runs environments as Pods in a development namespace; see the module docstring."""

    name = BACKEND

    def __init__(self, options: KubernetesOptions, *, objects: KubeObjects | None = None) -> None:
        """``objects`` replaces the API access (tests); by default it is built from
        ``options`` on first use, so constructing the backend needs no cluster."""
        self._options = options
        self._objects = objects or KubeObjects(options.connection())

    async def create(self, workspace: Workspace) -> None:
        """Create the environment's objects that are missing; its home claim is reused."""
        built = manifests.workspace_objects(workspace, self._options)
        await self._ensure(manifests.PERSISTENT_VOLUME_CLAIM, built.claim, workspace)
        await self._ensure(manifests.NETWORK_POLICY, built.network_policy, workspace)
        await self._ensure(manifests.SERVICE, built.service, workspace)
        if built.route is not None:
            await self._ensure(manifests.VIRTUAL_SERVICE, built.route, workspace)
        pod, created = await self._ensure(POD, built.pod, workspace)
        if not created and (pod.get("metadata") or {}).get("deletionTimestamp"):
            raise DependencyUnavailableError(
                "the environment's previous pod is still terminating",
                details={"workspace_id": str(workspace.workspace_id)},
            )
        log.info(
            "workspace created" if created else "workspace found already created",
            workspace_id=str(workspace.workspace_id),
            namespace=self._options.namespace,
            name=manifests.object_name(workspace.workspace_id),
        )

    async def status(self, workspace: Workspace) -> BackendStatus:
        pod = await self._objects.get(
            POD, manifests.object_name(workspace.workspace_id), namespace=self._options.namespace
        )
        status = pod_status(pod, workspace, self._options)
        if pod is not None and status.phase is not BackendPhase.GONE:
            await self._label_expiry(pod, workspace)
        return status

    async def stop(self, workspace: Workspace) -> None:
        """Delete the Pod, then its route, Service and NetworkPolicy; keep the home claim."""
        name = manifests.object_name(workspace.workspace_id)
        # Without an ingress host there never was a route, nor need Istio's CRD be installed.
        route = (manifests.VIRTUAL_SERVICE,) if manifests.routed(self._options) else ()
        for resource in (POD, *route, manifests.SERVICE, manifests.NETWORK_POLICY):
            await self._delete(resource, name, workspace)
        log.info("workspace stopped", workspace_id=str(workspace.workspace_id))

    async def delete(self, workspace: Workspace) -> None:
        """Stop, then delete the home claim (it goes once the Pod has ended)."""
        await self.stop(workspace)
        await self._delete(
            manifests.PERSISTENT_VOLUME_CLAIM,
            manifests.claim_name(workspace.workspace_id),
            workspace,
        )
        log.info("workspace deleted", workspace_id=str(workspace.workspace_id))

    async def close(self) -> None:
        self._objects.close()

    # --- helpers --------------------------------------------------------------------------

    async def _ensure(
        self, resource: Resource, body: dict[str, Any], workspace: Workspace
    ) -> tuple[dict[str, Any], bool]:
        obj, created = await self._objects.create_or_get(
            resource, body, namespace=self._options.namespace
        )
        if not carries(obj, workspace):
            raise ConflictError(
                f"{resource.kind} {self._options.namespace}/{body['metadata']['name']} exists "
                "and is not this environment's",
                details={"workspace_id": str(workspace.workspace_id)},
            )
        return obj, created

    async def _delete(self, resource: Resource, name: str, workspace: Workspace) -> None:
        obj = await self._objects.get(resource, name, namespace=self._options.namespace)
        if obj is None:
            return
        if not carries(obj, workspace):
            log.error(
                "not deleting an object that is not the environment's",
                kind=resource.kind,
                name=name,
                workspace_id=str(workspace.workspace_id),
            )
            return
        await self._objects.delete(
            resource, name, namespace=self._options.namespace, propagation="Background"
        )

    async def _label_expiry(self, pod: Mapping[str, Any], workspace: Workspace) -> None:
        if workspace.expires_at is None:
            return
        wanted = manifests.expires_at_label(workspace.expires_at)
        labels = (pod.get("metadata") or {}).get("labels") or {}
        if labels.get(manifests.EXPIRES_AT_LABEL) == wanted:
            return
        patch = {
            "metadata": {
                "labels": {manifests.EXPIRES_AT_LABEL: wanted},
                "annotations": {manifests.EXPIRES_AT_ANNOTATION: workspace.expires_at.isoformat()},
            }
        }
        try:
            await self._objects.patch(
                POD,
                manifests.object_name(workspace.workspace_id),
                patch,
                namespace=self._options.namespace,
            )
        except FlywheelError as error:
            # Gone meanwhile, refused, or unreachable: the next look tries again.
            log.warning(
                "could not label the environment's expiry",
                workspace_id=str(workspace.workspace_id),
                error=error.message,
            )
