import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from flywheel_clients.kubernetes import POD, KubernetesError
from flywheel_runtime.errors import ConflictError, DependencyUnavailableError
from flywheel_testing.kube import require_crds, validate_manifest
from flywheel_testing.kubeapi import KubeApiServer
from flywheel_workspaces.adapters import k8s_manifests as manifests
from flywheel_workspaces.adapters.k8s_manifests import (
    NETWORK_POLICY,
    PERSISTENT_VOLUME_CLAIM,
    SERVICE,
    VIRTUAL_SERVICE,
    KubernetesOptions,
)
from flywheel_workspaces.adapters.kubernetes import KubernetesBackend
from flywheel_workspaces.ports import (
    AllocationMode,
    BackendPhase,
    Workspace,
    WorkspaceSpec,
    WorkspaceState,
)

NAMESPACE = "flywheel-dev"
INGRESS_HOST = "dev.example.com"


def _options(kube_api: KubeApiServer, **overrides: Any) -> KubernetesOptions:
    return KubernetesOptions(
        api_host=kube_api.url,
        request_timeout_s=5,
        storage_class="standard",
        gpu_products={"a100": "NVIDIA-A100-SXM4-80GB"},
        **overrides,
    )


@pytest.fixture
async def backend(kube_api: KubeApiServer) -> AsyncIterator[KubernetesBackend]:
    backend = KubernetesBackend(_options(kube_api))
    yield backend
    await backend.close()


def _workspace(
    *,
    owner: str = "alice@example.com",
    mode: AllocationMode = AllocationMode.MIG,
    expires_at: datetime | None = None,
) -> Workspace:
    return Workspace(
        workspace_id=uuid.uuid4(),
        owner=owner,
        spec=WorkspaceSpec(
            image="registry.local/flywheel-ide:1",
            gpu_type="a100",
            gpu_count=1,
            mode=mode,
            mig_profile="1g.10gb" if mode is AllocationMode.MIG else None,
        ),
        state=WorkspaceState.PROVISIONING,
        requested_at=datetime(2025, 1, 1, tzinfo=UTC),
        expires_at=expires_at,
    )


def _name(workspace: Workspace) -> str:
    return manifests.object_name(workspace.workspace_id)


def _pod_path(workspace: Workspace) -> str:
    return POD.path(NAMESPACE, _name(workspace))


def _claim_path(workspace: Workspace) -> str:
    return PERSISTENT_VOLUME_CLAIM.path(NAMESPACE, manifests.claim_name(workspace.workspace_id))


def _paths(workspace: Workspace) -> dict[str, str]:
    name = _name(workspace)
    return {
        "claim": _claim_path(workspace),
        "network_policy": NETWORK_POLICY.path(NAMESPACE, name),
        "service": SERVICE.path(NAMESPACE, name),
        "pod": POD.path(NAMESPACE, name),
    }


def _route_path(workspace: Workspace) -> str:
    return VIRTUAL_SERVICE.path(NAMESPACE, _name(workspace))


@pytest.fixture
async def routed(kube_api: KubeApiServer) -> AsyncIterator[KubernetesBackend]:
    backend = KubernetesBackend(_options(kube_api, ingress_host=INGRESS_HOST))
    yield backend
    await backend.close()


def _without_server_fields(obj: dict[str, Any]) -> dict[str, Any]:
    metadata = {
        k: v
        for k, v in obj["metadata"].items()
        if k not in {"uid", "resourceVersion", "generation", "creationTimestamp"}
    }
    return {**obj, "metadata": metadata}


def _uid(kube_api: KubeApiServer, path: str) -> str:
    stored = kube_api.get(path)
    assert stored is not None, path
    return str(stored["metadata"]["uid"])


def _ready(kube_api: KubeApiServer, workspace: Workspace, *, ready: bool = True) -> None:
    kube_api.set_status(
        _pod_path(workspace),
        {
            "phase": "Running",
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": "True" if ready else "False"},
            ],
            "containerStatuses": [{"name": "workspace", "ready": ready, "state": {"running": {}}}],
        },
    )


# --- create ------------------------------------------------------------------------------------


async def test_create_makes_the_claim_policy_service_and_pod_as_built(
    kube_api: KubeApiServer, backend: KubernetesBackend
) -> None:
    workspace = _workspace()

    await backend.create(workspace)

    built = manifests.workspace_objects(workspace, _options(kube_api))
    for kind, path in _paths(workspace).items():
        stored = kube_api.get(path)
        assert stored is not None, kind
        assert _without_server_fields(stored) == getattr(built, kind), kind
        validate_manifest(stored, kube_version="1.37")
    posts = [r.path for r in kube_api.requests_to("POST")]
    assert posts == [
        f"/api/v1/namespaces/{NAMESPACE}/persistentvolumeclaims",
        f"/apis/networking.k8s.io/v1/namespaces/{NAMESPACE}/networkpolicies",
        f"/api/v1/namespaces/{NAMESPACE}/services",
        f"/api/v1/namespaces/{NAMESPACE}/pods",
    ], "the policy exists before the pod runs"


async def test_the_pod_asks_for_the_mig_slice_and_lands_in_the_dev_queue(
    kube_api: KubeApiServer, backend: KubernetesBackend
) -> None:
    workspace = _workspace(mode=AllocationMode.MIG)

    await backend.create(workspace)

    pod = kube_api.get(_pod_path(workspace))
    assert pod is not None
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/mig-1g.10gb"] == "1"
    assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "flywheel-dev"
    assert pod["spec"]["priorityClassName"] == "flywheel-dev"
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == (
        manifests.claim_name(workspace.workspace_id)
    )


async def test_create_twice_makes_each_object_once(
    kube_api: KubeApiServer, backend: KubernetesBackend
) -> None:
    workspace = _workspace()
    await backend.create(workspace)
    uids = {kind: _uid(kube_api, path) for kind, path in _paths(workspace).items()}

    await backend.create(workspace)

    for kind, path in _paths(workspace).items():
        assert _uid(kube_api, path) == uids[kind], kind
        assert len(kube_api.objects(path.rsplit("/", 1)[0])) == 1, kind


async def test_a_name_taken_by_another_environment_is_a_conflict(
    kube_api: KubeApiServer, backend: KubernetesBackend
) -> None:
    workspace = _workspace()
    squatter = manifests.pod(_workspace(), _options(kube_api))
    squatter["metadata"]["name"] = _name(workspace)
    kube_api.put(POD.path(NAMESPACE), squatter)

    with pytest.raises(ConflictError, match="not this environment's"):
        await backend.create(workspace)


async def test_a_previous_pod_still_terminating_asks_for_a_retry(
    kube_api: KubeApiServer, backend: KubernetesBackend
) -> None:
    workspace = _workspace()
    terminating = manifests.pod(workspace, _options(kube_api))
    terminating["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    kube_api.put(POD.path(NAMESPACE), terminating)

    with pytest.raises(DependencyUnavailableError, match="still terminating"):
        await backend.create(workspace)


async def test_a_refused_pod_is_a_kubernetes_error(
    kube_api: KubeApiServer, backend: KubernetesBackend
) -> None:
    kube_api.fail("POST", "/pods", 422)

    with pytest.raises(KubernetesError, match="422"):
        await backend.create(_workspace())


# --- status ------------------------------------------------------------------------------------


async def test_no_pod_is_gone(backend: KubernetesBackend) -> None:
    status = await backend.status(_workspace())

    assert status.phase is BackendPhase.GONE
    assert status.connection is None


async def test_a_pod_waiting_for_kueue_is_pending(
    kube_api: KubeApiServer, backend: KubernetesBackend
) -> None:
    workspace = _workspace()
    await backend.create(workspace)
    kube_api.set_status(
        _pod_path(workspace),
        {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}
            ],
        },
    )

    status = await backend.status(workspace)

    assert status.phase is BackendPhase.PENDING
    assert status.message == "waiting for admission to the development queue"


async def test_a_pod_pulling_its_image_is_pending_with_the_reason(
    kube_api: KubeApiServer, backend: KubernetesBackend
) -> None:
    workspace = _workspace()
    await backend.create(workspace)
    kube_api.set_status(
        _pod_path(workspace),
        {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [
                {
                    "name": "workspace",
                    "ready": False,
                    "state": {"waiting": {"reason": "ContainerCreating"}},
                }
            ],
        },
    )

    status = await backend.status(workspace)

    assert status.phase is BackendPhase.PENDING
    assert status.message == "ContainerCreating"


async def test_running_but_not_ready_is_pending(
    kube_api: KubeApiServer, backend: KubernetesBackend
) -> None:
    workspace = _workspace()
    await backend.create(workspace)
    _ready(kube_api, workspace, ready=False)

    assert (await backend.status(workspace)).phase is BackendPhase.PENDING


async def test_running_and_ready_is_ready_with_the_services_address(
    kube_api: KubeApiServer, backend: KubernetesBackend
) -> None:
    workspace = _workspace()
    await backend.create(workspace)
    _ready(kube_api, workspace)

    status = await backend.status(workspace)

    host = f"{_name(workspace)}.{NAMESPACE}.svc.cluster.local"
    assert status.phase is BackendPhase.READY
    assert status.connection is not None
    assert status.connection.url == f"http://{host}:8443/"
    assert status.connection.ssh == f"ssh -p 2222 workspace@{host}"
    assert status.last_activity_at is None


async def test_behind_the_ingress_host_the_url_is_the_public_one(
    kube_api: KubeApiServer, routed: KubernetesBackend
) -> None:
    workspace = _workspace()
    await routed.create(workspace)
    _ready(kube_api, workspace)

    status = await routed.status(workspace)

    assert status.connection is not None
    assert status.connection.url == f"https://{INGRESS_HOST}/workspaces/{workspace.workspace_id}/"
    assert status.connection.ssh_tunnel == (
        f"kubectl -n {NAMESPACE} port-forward service/{_name(workspace)} 2222:ssh"
    )


@pytest.mark.parametrize(
    ("annotation", "expected"),
    [
        ("2025-01-01T10:00:00Z", datetime(2025, 1, 1, 10, tzinfo=UTC)),
        ("1735725600", datetime(2025, 1, 1, 10, tzinfo=UTC)),
        ("yesterday", None),
    ],
)
async def test_last_activity_is_the_sidecars_annotation(
    kube_api: KubeApiServer,
    backend: KubernetesBackend,
    annotation: str,
    expected: datetime | None,
) -> None:
    workspace = _workspace()
    await backend.create(workspace)
    _ready(kube_api, workspace)
    kube_api.patch(
        _pod_path(workspace),
        {"metadata": {"annotations": {manifests.LAST_ACTIVITY_ANNOTATION: annotation}}},
    )

    status = await backend.status(workspace)

    assert status.last_activity_at == expected


@pytest.mark.parametrize(
    ("pod_status", "message"),
    [
        ({"phase": "Failed", "reason": "Evicted", "message": "low on memory"}, "Evicted"),
        ({"phase": "Failed", "reason": "Preempted"}, "Preempted"),
        ({"phase": "Succeeded"}, "succeeded"),
        (
            {
                "phase": "Pending",
                "containerStatuses": [
                    {
                        "name": "workspace",
                        "ready": False,
                        "state": {"waiting": {"reason": "InvalidImageName", "message": "bad"}},
                    }
                ],
            },
            "InvalidImageName",
        ),
    ],
)
async def test_an_ended_or_unstartable_pod_is_failed(
    kube_api: KubeApiServer,
    backend: KubernetesBackend,
    pod_status: dict[str, Any],
    message: str,
) -> None:
    workspace = _workspace()
    await backend.create(workspace)
    kube_api.set_status(_pod_path(workspace), pod_status)

    status = await backend.status(workspace)

    assert status.phase is BackendPhase.FAILED
    assert status.message is not None
    assert message in status.message


async def test_a_pod_being_deleted_is_gone(
    kube_api: KubeApiServer, backend: KubernetesBackend
) -> None:
    workspace = _workspace()
    pod = manifests.pod(workspace, _options(kube_api))
    pod["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    kube_api.put(POD.path(NAMESPACE), pod)

    assert (await backend.status(workspace)).phase is BackendPhase.GONE


async def test_status_brings_the_expiry_label_in_line_once(
    kube_api: KubeApiServer, backend: KubernetesBackend
) -> None:
    workspace = _workspace()
    await backend.create(workspace)
    _ready(kube_api, workspace)
    expires = datetime(2025, 1, 1, 18, tzinfo=UTC)
    known = workspace.model_copy(update={"expires_at": expires})

    await backend.status(known)
    await backend.status(known)

    pod = kube_api.get(_pod_path(workspace))
    assert pod is not None
    assert pod["metadata"]["labels"][manifests.EXPIRES_AT_LABEL] == str(int(expires.timestamp()))
    assert pod["metadata"]["annotations"][manifests.EXPIRES_AT_ANNOTATION] == expires.isoformat()
    assert pod["metadata"]["annotations"][manifests.OWNER_ANNOTATION] == workspace.owner
    (patch,) = kube_api.requests_to("PATCH", "/pods/")
    assert patch.content_type == "application/merge-patch+json"


async def test_an_api_server_that_does_not_answer_is_retryable(
    kube_api: KubeApiServer, backend: KubernetesBackend
) -> None:
    kube_api.fail("GET", "/pods/", 503)

    with pytest.raises(DependencyUnavailableError):
        await backend.status(_workspace())


# --- stop and delete -----------------------------------------------------------------------------


async def test_stop_removes_the_compute_and_keeps_the_home_claim(
    kube_api: KubeApiServer, backend: KubernetesBackend
) -> None:
    workspace = _workspace()
    await backend.create(workspace)
    claim_uid = _uid(kube_api, _claim_path(workspace))

    await backend.stop(workspace)

    paths = _paths(workspace)
    assert kube_api.get(paths["pod"]) is None
    assert kube_api.get(paths["service"]) is None
    assert kube_api.get(paths["network_policy"]) is None
    assert _uid(kube_api, paths["claim"]) == claim_uid
    assert (await backend.status(workspace)).phase is BackendPhase.GONE
    for request in kube_api.requests_to("DELETE"):
        assert request.body["propagationPolicy"] == "Background"


async def test_the_home_claim_survives_expiry_and_the_next_start_mounts_it(
    kube_api: KubeApiServer, backend: KubernetesBackend
) -> None:
    workspace = _workspace()
    await backend.create(workspace)
    claim_uid = _uid(kube_api, _claim_path(workspace))
    await backend.stop(workspace)

    await backend.create(workspace)

    assert _uid(kube_api, _claim_path(workspace)) == claim_uid
    pod = kube_api.get(_pod_path(workspace))
    assert pod is not None
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == (
        manifests.claim_name(workspace.workspace_id)
    )


async def test_stop_twice_is_fine(kube_api: KubeApiServer, backend: KubernetesBackend) -> None:
    workspace = _workspace()
    await backend.create(workspace)

    await backend.stop(workspace)
    await backend.stop(workspace)

    assert kube_api.get(_claim_path(workspace)) is not None


async def test_delete_removes_the_home_claim_too_and_twice_is_fine(
    kube_api: KubeApiServer, backend: KubernetesBackend
) -> None:
    workspace = _workspace()
    await backend.create(workspace)

    await backend.delete(workspace)
    await backend.delete(workspace)

    for kind, path in _paths(workspace).items():
        assert kube_api.get(path) is None, kind


async def test_stop_leaves_another_environments_objects_alone(
    kube_api: KubeApiServer, backend: KubernetesBackend
) -> None:
    mine, theirs = _workspace(), _workspace(owner="bob@example.com")
    await backend.create(mine)
    await backend.create(theirs)

    await backend.delete(mine)

    for kind, path in _paths(theirs).items():
        assert kube_api.get(path) is not None, kind


# --- the route behind the ingress host -----------------------------------------------------------


async def test_create_routes_the_ide_path_on_the_gateway_before_the_pod_runs(
    kube_api: KubeApiServer, routed: KubernetesBackend
) -> None:
    require_crds()  # the route is an Istio VirtualService
    workspace = _workspace()

    await routed.create(workspace)

    stored = kube_api.get(_route_path(workspace))
    assert stored is not None
    built = manifests.route(workspace, _options(kube_api, ingress_host=INGRESS_HOST))
    assert _without_server_fields(stored) == built
    validate_manifest(_without_server_fields(stored))
    spec = stored["spec"]
    assert spec["hosts"] == [INGRESS_HOST]
    assert spec["gateways"] == ["istio-system/flywheel-gateway"]
    forward = spec["http"][-1]
    assert forward["match"] == [{"uri": {"prefix": f"/workspaces/{workspace.workspace_id}/"}}]
    assert forward["route"][0]["destination"] == {
        "host": f"{_name(workspace)}.{NAMESPACE}.svc.cluster.local",
        "port": {"number": 8443},
    }
    assert kube_api.get(SERVICE.path(NAMESPACE, _name(workspace))) is not None
    posts = [r.path for r in kube_api.requests_to("POST")]
    assert posts.index(f"/apis/networking.istio.io/v1/namespaces/{NAMESPACE}/virtualservices") == (
        posts.index(f"/api/v1/namespaces/{NAMESPACE}/pods") - 1
    )


async def test_create_twice_routes_once(kube_api: KubeApiServer, routed: KubernetesBackend) -> None:
    workspace = _workspace()
    await routed.create(workspace)
    uid = _uid(kube_api, _route_path(workspace))

    await routed.create(workspace)

    assert _uid(kube_api, _route_path(workspace)) == uid
    assert len(kube_api.objects(VIRTUAL_SERVICE.path(NAMESPACE))) == 1


async def test_a_route_name_taken_by_another_environment_is_a_conflict(
    kube_api: KubeApiServer, routed: KubernetesBackend
) -> None:
    workspace = _workspace()
    squatter = manifests.route(_workspace(), _options(kube_api, ingress_host=INGRESS_HOST))
    assert squatter is not None
    squatter["metadata"]["name"] = _name(workspace)
    kube_api.put(VIRTUAL_SERVICE.path(NAMESPACE), squatter)

    with pytest.raises(ConflictError, match="VirtualService"):
        await routed.create(workspace)
    assert kube_api.get(_pod_path(workspace)) is None


async def test_stop_removes_the_route_and_twice_is_fine(
    kube_api: KubeApiServer, routed: KubernetesBackend
) -> None:
    workspace = _workspace()
    await routed.create(workspace)

    await routed.stop(workspace)
    assert kube_api.get(_route_path(workspace)) is None
    await routed.stop(workspace)

    assert kube_api.get(_route_path(workspace)) is None
    assert kube_api.get(_claim_path(workspace)) is not None


async def test_a_restart_routes_again_and_delete_removes_the_route_twice_fine(
    kube_api: KubeApiServer, routed: KubernetesBackend
) -> None:
    workspace = _workspace()
    await routed.create(workspace)
    await routed.stop(workspace)
    await routed.create(workspace)
    assert kube_api.get(_route_path(workspace)) is not None

    await routed.delete(workspace)
    await routed.delete(workspace)

    assert kube_api.get(_route_path(workspace)) is None
    for kind, path in _paths(workspace).items():
        assert kube_api.get(path) is None, kind


async def test_delete_leaves_another_environments_route_alone(
    kube_api: KubeApiServer, routed: KubernetesBackend
) -> None:
    mine, theirs = _workspace(), _workspace(owner="bob@example.com")
    await routed.create(mine)
    await routed.create(theirs)

    await routed.delete(mine)

    assert kube_api.get(_route_path(theirs)) is not None


async def test_without_an_ingress_host_nothing_touches_routes(
    kube_api: KubeApiServer, backend: KubernetesBackend
) -> None:
    workspace = _workspace()

    await backend.create(workspace)
    await backend.stop(workspace)
    await backend.delete(workspace)

    assert kube_api.requests_to("GET", "/virtualservices") == []
    assert not [r for r in kube_api.requests if "networking.istio.io" in r.path]
