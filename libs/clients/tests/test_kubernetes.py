import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from flywheel_clients.kubernetes import (
    CONFIG_MAP,
    JOB,
    LOCAL_QUEUE,
    MERGE_PATCH,
    POD,
    PYTORCH_JOB,
    KubeConnection,
    KubeObjects,
    KubernetesError,
    Resource,
)
from flywheel_runtime.errors import ConflictError, DependencyUnavailableError
from flywheel_testing.kubeapi import KubeApiServer
from flywheel_testing.net import free_port

NAMESPACE = "flywheel"
JOBS = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs"


def _config_map(name: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels},
        "data": {"key": "value"},
    }


@pytest.fixture
def objects(kube_api: KubeApiServer) -> KubeObjects:
    return KubeObjects(KubeConnection(host=kube_api.url, request_timeout_s=5))


def test_paths_follow_the_api_layout() -> None:
    assert JOB.path("ns") == "/apis/batch/v1/namespaces/ns/jobs"
    assert POD.path("ns", "p-1", "log") == "/api/v1/namespaces/ns/pods/p-1/log"
    assert PYTORCH_JOB.path("ns", "j") == "/apis/kubeflow.org/v1/namespaces/ns/pytorchjobs/j"
    assert LOCAL_QUEUE.path("ns", "q") == "/apis/kueue.x-k8s.io/v1beta2/namespaces/ns/localqueues/q"
    flavors = Resource("kueue.x-k8s.io/v1beta2", "ResourceFlavor", "resourceflavors", False)
    assert flavors.path(name="a100") == "/apis/kueue.x-k8s.io/v1beta2/resourceflavors/a100"
    with pytest.raises(ValueError, match="namespaced"):
        JOB.path(None)
    with pytest.raises(ValueError, match="not a valid"):
        JOB.path("ns", "a/b")


async def test_create_get_list_and_delete_round_trip(
    objects: KubeObjects, kube_api: KubeApiServer
) -> None:
    created = await objects.create(CONFIG_MAP, _config_map("a", app="x"), namespace=NAMESPACE)
    await objects.create(CONFIG_MAP, _config_map("b", app="y"), namespace=NAMESPACE)

    got = await objects.get(CONFIG_MAP, "a", namespace=NAMESPACE)
    listed = await objects.list_objects(CONFIG_MAP, namespace=NAMESPACE, label_selector="app=x")
    deleted = await objects.delete(CONFIG_MAP, "a", namespace=NAMESPACE)

    assert created["metadata"]["uid"]
    assert got == created
    assert [o["metadata"]["name"] for o in listed] == ["a"]
    assert deleted
    assert await objects.get(CONFIG_MAP, "a", namespace=NAMESPACE) is None
    assert not await objects.delete(CONFIG_MAP, "a", namespace=NAMESPACE)
    assert [r.body["propagationPolicy"] for r in kube_api.requests_to("DELETE")] == [
        "Foreground",
        "Foreground",
    ]


async def test_a_second_create_reads_the_first_object(objects: KubeObjects) -> None:
    first, created_first = await objects.create_or_get(
        CONFIG_MAP, _config_map("same"), namespace=NAMESPACE
    )
    second, created_second = await objects.create_or_get(
        CONFIG_MAP, _config_map("same"), namespace=NAMESPACE
    )

    assert (created_first, created_second) == (True, False)
    assert second["metadata"]["uid"] == first["metadata"]["uid"]
    with pytest.raises(ConflictError, match="already exists"):
        await objects.create(CONFIG_MAP, _config_map("same"), namespace=NAMESPACE)


async def test_patches_are_json_merge_patches(
    objects: KubeObjects, kube_api: KubeApiServer
) -> None:
    await objects.create(
        CONFIG_MAP,
        {**_config_map("c"), "data": {"keep": "1", "drop": "2"}},
        namespace=NAMESPACE,
    )

    patched = await objects.patch(
        CONFIG_MAP, "c", {"data": {"drop": None, "new": "3"}}, namespace=NAMESPACE
    )

    assert patched["data"] == {"keep": "1", "new": "3"}
    (request,) = kube_api.requests_to("PATCH")
    assert request.content_type == MERGE_PATCH


async def test_pod_logs_come_back_as_text_even_when_they_look_like_json(
    objects: KubeObjects, kube_api: KubeApiServer
) -> None:
    kube_api.put(f"/api/v1/namespaces/{NAMESPACE}/pods", {"metadata": {"name": "p"}})
    line = json.dumps({"event": "epoch done", "epoch": 1})
    kube_api.set_log(NAMESPACE, "p", f"first\n{line}\n", container="trainer")

    whole = await objects.read_log("p", namespace=NAMESPACE, container="trainer")
    last = await objects.read_log("p", namespace=NAMESPACE, container="trainer", tail_lines=1)

    assert whole == f"first\n{line}\n"
    assert last == f"{line}\n"
    assert await objects.read_log("gone", namespace=NAMESPACE) is None


async def test_a_refusal_carries_the_api_servers_message(
    objects: KubeObjects, kube_api: KubeApiServer
) -> None:
    kube_api.fail("POST", "/jobs", 422)

    with pytest.raises(KubernetesError, match=r"\(422\): injected failure") as caught:
        await objects.create(JOB, {"metadata": {"name": "j"}}, namespace=NAMESPACE)

    assert not caught.value.retryable
    assert caught.value.details["object"] == "Job flywheel/j"


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_server_trouble_is_retryable(
    objects: KubeObjects, kube_api: KubeApiServer, status: int
) -> None:
    kube_api.fail("GET", "/jobs/j", status)

    with pytest.raises(DependencyUnavailableError) as caught:
        await objects.get(JOB, "j", namespace=NAMESPACE)

    assert caught.value.retryable


async def test_an_api_server_that_does_not_answer_is_retryable() -> None:
    connection = KubeConnection(host=f"http://127.0.0.1:{free_port()}", request_timeout_s=2)
    objects = KubeObjects(connection)

    with pytest.raises(DependencyUnavailableError, match="did not answer"):
        await objects.get(JOB, "j", namespace=NAMESPACE)
    objects.close()


async def test_a_missing_kubeconfig_is_a_clear_error(tmp_path: Path) -> None:
    connection = KubeConnection(mode="kubeconfig", kubeconfig=tmp_path / "missing.yaml")
    objects = KubeObjects(connection)

    with pytest.raises(KubernetesError, match="cannot load the Kubernetes configuration"):
        await objects.get(JOB, "j", namespace=NAMESPACE)


async def test_deleting_an_owner_takes_its_dependents_along(
    objects: KubeObjects, kube_api: KubeApiServer
) -> None:
    job = await objects.create(JOB, {"metadata": {"name": "j"}, "spec": {}}, namespace=NAMESPACE)
    owned = _config_map("owned")
    owned["metadata"]["ownerReferences"] = [
        {"apiVersion": "batch/v1", "kind": "Job", "name": "j", "uid": job["metadata"]["uid"]}
    ]
    await objects.create(CONFIG_MAP, owned, namespace=NAMESPACE)

    await objects.delete(JOB, "j", namespace=NAMESPACE)

    assert kube_api.objects(JOBS) == []
    assert await objects.get(CONFIG_MAP, "owned", namespace=NAMESPACE) is None


def test_the_stand_in_server_refuses_json_patch_as_it_serves_only_merge_patches(
    kube_api: KubeApiServer,
) -> None:
    kube_api.put(f"/api/v1/namespaces/{NAMESPACE}/configmaps", _config_map("c"))
    request = urllib.request.Request(  # noqa: S310 - a local test server
        f"{kube_api.url}/api/v1/namespaces/{NAMESPACE}/configmaps/c",
        data=json.dumps([{"op": "add", "path": "/data/a", "value": "b"}]).encode(),
        method="PATCH",
        headers={"Content-Type": "application/json-patch+json"},
    )

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)  # noqa: S310 - a local test server

    assert refused.value.code == 415


async def test_a_patch_over_a_stale_resource_version_conflicts(objects: KubeObjects) -> None:
    created = await objects.create(CONFIG_MAP, _config_map("c"), namespace=NAMESPACE)
    stale = created["metadata"]["resourceVersion"]
    await objects.patch(CONFIG_MAP, "c", {"data": {"a": "1"}}, namespace=NAMESPACE)

    with pytest.raises(ConflictError):
        await objects.patch(
            CONFIG_MAP,
            "c",
            {"metadata": {"resourceVersion": stale}, "data": {"a": "2"}},
            namespace=NAMESPACE,
        )


async def test_spec_changes_bump_the_generation_and_status_writes_do_not(
    objects: KubeObjects,
) -> None:
    body = {"metadata": {"name": "j"}, "spec": {"parallelism": 1}}
    created = await objects.create(JOB, body, namespace=NAMESPACE)

    status = await objects.patch(
        JOB, "j", {"status": {"active": 1}}, namespace=NAMESPACE, subresource="status"
    )
    ignored = await objects.patch(JOB, "j", {"status": {"active": 5}}, namespace=NAMESPACE)
    changed = await objects.patch(JOB, "j", {"spec": {"parallelism": 2}}, namespace=NAMESPACE)

    assert created["metadata"]["generation"] == 1
    assert (status["metadata"]["generation"], status["status"]) == (1, {"active": 1})
    assert ignored["status"] == {"active": 1}
    assert changed["metadata"]["generation"] == 2
