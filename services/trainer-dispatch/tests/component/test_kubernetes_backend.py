import itertools
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic import SecretStr

from flywheel_clients.kubernetes import JOB, LOCAL_QUEUE, POD, PYTORCH_JOB
from flywheel_runtime.errors import DependencyUnavailableError
from flywheel_runtime.settings import PlatformSettings
from flywheel_testing.kube import CrdSchema, load_crd_schemas, validate_manifest
from flywheel_testing.kubeapi import KubeApiServer
from flywheel_trainer_dispatch.adapters.kubernetes import KubernetesBackend
from flywheel_trainer_dispatch.adapters.local import TrainingOptions
from flywheel_trainer_dispatch.errors import LaunchError
from flywheel_trainer_dispatch.ports import Phase, RunHandle, RunSpec, RunStatus, TrainingOutput
from flywheel_trainer_dispatch.scheduler import Priority
from flywheel_trainer_dispatch.settings import KubernetesSettings

NAMESPACE = "flywheel"
QUEUE = "flywheel-training"


@dataclass
class FakeResults:
    """The MLflow lookup: what each run registered, or an MLflow that is down."""

    outputs: dict[uuid.UUID, TrainingOutput] = field(default_factory=dict)
    down: bool = False
    closed: bool = False

    async def result(self, run_id: uuid.UUID) -> TrainingOutput | None:
        if self.down:
            raise DependencyUnavailableError("MLflow did not answer")
        return self.outputs.get(run_id)

    def close(self) -> None:
        self.closed = True

    def register(self, run_id: uuid.UUID) -> TrainingOutput:
        output = TrainingOutput(
            run_id="mlflow-run-1",
            model_name="digits-classifier",
            version="7",
            base_version="6",
            metrics={"val_accuracy": 0.97},
            world_size=1,
            training_run_id=str(run_id),
        )
        self.outputs[run_id] = output
        return output


@pytest.fixture
def results() -> FakeResults:
    return FakeResults()


@pytest.fixture(scope="module")
def crds() -> dict[tuple[str, str], CrdSchema]:
    try:
        return load_crd_schemas()
    except FileNotFoundError as error:
        pytest.skip(f"CRD checks skipped: {error}")


def _queue(kube_api: KubeApiServer, namespace: str, *, pending: int = 0, admitted: int = 0) -> None:
    kube_api.put(
        LOCAL_QUEUE.path(namespace),
        {
            "apiVersion": LOCAL_QUEUE.api_version,
            "kind": "LocalQueue",
            "metadata": {"name": QUEUE},
            "spec": {"clusterQueue": "training"},
        },
    )
    kube_api.set_status(
        LOCAL_QUEUE.path(namespace, QUEUE),
        {"pendingWorkloads": pending, "admittedWorkloads": admitted},
    )


def _backend(
    kube_api: KubeApiServer,
    results: FakeResults,
    *,
    tail_lines: int = 3,
    step_s: float = 60.0,
    **overrides: Any,
) -> KubernetesBackend:
    settings = KubernetesSettings.model_validate(
        {
            "connection": {"host": kube_api.url, "request_timeout_s": 5},
            "namespace": NAMESPACE,
            "queue_name": QUEUE,
            "log_refresh_s": 30,
            "cancel_wait_s": 5,
            **overrides,
        }
    )
    return KubernetesBackend(
        settings,
        TrainingOptions(threads_per_process=2),
        PlatformSettings(s3_secret_key=SecretStr("s3-secret-value")),
        results,
        timeout_s=3600,
        kill_grace_s=2,
        tail_lines=tail_lines,
        # ``step_s`` passes between any two looks (by default, more than log_refresh_s).
        clock=itertools.count(0.0, step_s).__next__,
    )


def _spec(
    *, priority: Priority | None = Priority.THRESHOLD, excluded: tuple[uuid.UUID, ...] = ()
) -> RunSpec:
    return RunSpec(
        run_id=uuid.uuid4(),
        project_id="digits",
        model_line="digits-classifier",
        snapshot_id="snap-1",
        registered_model="digits-classifier",
        correlation_id=uuid.uuid4(),
        excluded_label_ids=excluded,
        priority=priority,
    )


def _name(spec: RunSpec) -> str:
    return f"flywheel-train-{spec.run_id}"


def _pod(
    kube_api: KubeApiServer,
    spec: RunSpec,
    *,
    name: str,
    role: str = "trainer",
    container: str = "trainer",
    exit_code: int | None = None,
    reason: str = "Error",
    namespace: str = NAMESPACE,
) -> None:
    """Play the job controller and the kubelet: a pod of the run, ended or running."""
    state: dict[str, Any] = (
        {"running": {}}
        if exit_code is None
        else {"terminated": {"exitCode": exit_code, "reason": reason}}
    )
    kube_api.put(
        POD.path(namespace),
        {
            "metadata": {
                "name": name,
                "labels": {"flywheel.dev/run-id": str(spec.run_id), "flywheel.dev/role": role},
            },
            "status": {"containerStatuses": [{"name": container, "state": state}]},
        },
    )


def _condition(kube_api: KubeApiServer, path: str, kind: str, **fields: str) -> None:
    """Play the job controller: the workload reached ``kind`` (Complete, Failed, …)."""
    kube_api.set_status(path, {"conditions": [{"type": kind, "status": "True", **fields}]})


def _as_applied(obj: dict[str, Any]) -> dict[str, Any]:
    """The object as the client sent it: without status and what the API server adds."""
    added = {"uid", "resourceVersion", "generation", "creationTimestamp"}
    metadata = {k: v for k, v in obj["metadata"].items() if k not in added}
    return {k: v for k, v in obj.items() if k != "status"} | {"metadata": metadata}


async def test_a_run_goes_from_created_to_running_to_succeeded_with_its_result(
    kube_api: KubeApiServer, results: FakeResults
) -> None:
    _queue(kube_api, NAMESPACE)
    backend = _backend(kube_api, results)
    spec = _spec(excluded=(uuid.UUID(int=5),))
    job_path = JOB.path(NAMESPACE, _name(spec))

    handle = await backend.launch(spec)

    job = kube_api.get(job_path)
    assert job is not None
    validate_manifest(_as_applied(job))
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == QUEUE
    assert "s3-secret-value" not in json.dumps(job)
    config_map = kube_api.get(f"/api/v1/namespaces/{NAMESPACE}/configmaps/{_name(spec)}")
    assert config_map is not None
    assert config_map["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    assert handle.details["kind"] == "Job"
    assert handle.details["cluster"] == "default"
    assert handle.command == job["spec"]["template"]["spec"]["containers"][0]["command"]

    queued = await backend.poll(handle)
    assert queued.phase is Phase.RUNNING  # suspended until Kueue admits it

    kube_api.set_status(job_path, {"active": 1})
    _pod(kube_api, spec, name=f"{_name(spec)}-abcde")
    kube_api.set_log(NAMESPACE, f"{_name(spec)}-abcde", "loading\nepoch 0\nepoch 1\nepoch 2\n")
    running = await backend.poll(handle)
    assert running.phase is Phase.RUNNING
    assert running.log_tail == "epoch 0\nepoch 1\nepoch 2"

    output = results.register(spec.run_id)
    _condition(kube_api, job_path, "Complete")
    done = await backend.poll(handle)

    assert done.phase is Phase.SUCCEEDED
    assert done.output == output
    assert done.exit_code == 0
    assert kube_api.get(f"/api/v1/namespaces/{NAMESPACE}/configmaps/{_name(spec)}") is None


async def test_a_failed_run_reports_the_exit_code_and_the_end_of_its_log(
    kube_api: KubeApiServer, results: FakeResults
) -> None:
    _queue(kube_api, NAMESPACE)
    backend = _backend(kube_api, results, tail_lines=2)
    spec = _spec()
    handle = await backend.launch(spec)
    pod = f"{_name(spec)}-xyz12"
    _pod(kube_api, spec, name=pod, exit_code=3)
    kube_api.set_log(NAMESPACE, pod, "snapshot loaded\nTraceback\nValueError: boom\n")
    _condition(
        kube_api,
        JOB.path(NAMESPACE, _name(spec)),
        "Failed",
        reason="BackoffLimitExceeded",
        message="Job has reached the specified backoff limit",
    )

    status = await backend.poll(handle)

    assert status.phase is Phase.FAILED
    assert status.exit_code == 3
    assert status.log_tail.splitlines() == [
        "# Job flywheel-train-"
        f"{spec.run_id} failed: BackoffLimitExceeded: Job has reached the specified backoff limit",
        f"# pod {pod}, container trainer: Error (exit code 3)",
        "Traceback",
        "ValueError: boom",
    ]
    assert status.handle == handle


async def test_a_failed_run_that_registered_its_version_still_succeeds(
    kube_api: KubeApiServer, results: FakeResults
) -> None:
    _queue(kube_api, NAMESPACE)
    backend = _backend(kube_api, results)
    spec = _spec()
    handle = await backend.launch(spec)
    results.register(spec.run_id)
    _condition(kube_api, JOB.path(NAMESPACE, _name(spec)), "Failed", reason="DeadlineExceeded")

    status = await backend.poll(handle)

    assert status.phase is Phase.SUCCEEDED
    assert status.output is not None


async def test_a_completed_run_without_a_version_failed(
    kube_api: KubeApiServer, results: FakeResults
) -> None:
    _queue(kube_api, NAMESPACE)
    backend = _backend(kube_api, results)
    spec = _spec()
    handle = await backend.launch(spec)
    _condition(kube_api, JOB.path(NAMESPACE, _name(spec)), "Complete")

    status = await backend.poll(handle)

    assert (status.phase, status.exit_code) == (Phase.FAILED, 0)


async def test_launching_twice_makes_one_object(
    kube_api: KubeApiServer, results: FakeResults
) -> None:
    _queue(kube_api, NAMESPACE)
    backend = _backend(kube_api, results)
    spec = _spec(excluded=(uuid.UUID(int=9),))

    first = await backend.launch(spec)
    second = await backend.launch(spec)

    assert len(kube_api.objects(JOB.path(NAMESPACE))) == 1
    assert len(kube_api.requests_to("POST", "/jobs")) == 2
    assert first.details["uid"] == second.details["uid"]
    assert len(kube_api.objects(f"/api/v1/namespaces/{NAMESPACE}/configmaps")) == 1


async def test_an_object_of_another_run_under_the_name_is_not_taken_over(
    kube_api: KubeApiServer, results: FakeResults
) -> None:
    _queue(kube_api, NAMESPACE)
    spec = _spec()
    kube_api.put(
        JOB.path(NAMESPACE),
        {"metadata": {"name": _name(spec), "labels": {"flywheel.dev/run-id": "someone-else"}}},
    )

    with pytest.raises(LaunchError, match="is not this run's"):
        await _backend(kube_api, results).launch(spec)


async def test_a_manifest_the_api_server_refuses_fails_the_launch(
    kube_api: KubeApiServer, results: FakeResults
) -> None:
    _queue(kube_api, NAMESPACE)
    kube_api.fail("POST", "/jobs", 422)

    with pytest.raises(LaunchError, match="422"):
        await _backend(kube_api, results).launch(_spec(excluded=(uuid.UUID(int=1),)))

    assert kube_api.objects(f"/api/v1/namespaces/{NAMESPACE}/configmaps") == []


async def test_a_missing_kueue_queue_fails_the_launch_with_the_reason(
    kube_api: KubeApiServer, results: FakeResults
) -> None:
    with pytest.raises(LaunchError, match="LocalQueue flywheel/flywheel-training not found"):
        await _backend(kube_api, results).launch(_spec())


async def test_an_api_server_that_does_not_answer_never_fails_a_run(
    kube_api: KubeApiServer, results: FakeResults
) -> None:
    _queue(kube_api, NAMESPACE)
    backend = _backend(kube_api, results)
    spec = _spec()
    handle = await backend.launch(spec)

    kube_api.fail("GET", f"/jobs/{_name(spec)}", 503)
    unseen = await backend.poll(handle)
    kube_api.fail("GET", f"/jobs/{_name(spec)}", 403)
    forbidden = await backend.poll(handle)
    kube_api.fail("GET", f"/jobs/{_name(spec)}", 503)
    after_restart = await backend.recover(handle)
    kube_api.fail("GET", "/localqueues/", 503)

    assert unseen.phase is Phase.RUNNING
    assert forbidden.phase is Phase.RUNNING
    assert after_restart.phase is Phase.RUNNING
    with pytest.raises(DependencyUnavailableError, match="no cluster can take the run now"):
        await backend.launch(_spec())


async def test_a_finished_run_waits_for_mlflow_rather_than_failing(
    kube_api: KubeApiServer, results: FakeResults
) -> None:
    _queue(kube_api, NAMESPACE)
    backend = _backend(kube_api, results)
    spec = _spec()
    handle = await backend.launch(spec)
    _condition(kube_api, JOB.path(NAMESPACE, _name(spec)), "Complete")
    results.down = True

    waiting = await backend.poll(handle)
    results.down = False
    results.register(spec.run_id)
    done = await backend.poll(handle)

    assert waiting.phase is Phase.RUNNING
    assert done.phase is Phase.SUCCEEDED


async def test_cancel_deletes_the_run_with_foreground_propagation(
    kube_api: KubeApiServer, results: FakeResults
) -> None:
    _queue(kube_api, NAMESPACE)
    backend = _backend(kube_api, results)
    spec = _spec(excluded=(uuid.UUID(int=3),))
    handle = await backend.launch(spec)
    _pod(kube_api, spec, name=f"{_name(spec)}-p")

    await backend.cancel(handle)
    after = await backend.poll(handle)

    (deletion,) = kube_api.requests_to("DELETE", "/jobs/")
    assert deletion.body["propagationPolicy"] == "Foreground"
    assert kube_api.objects(JOB.path(NAMESPACE)) == []
    assert kube_api.objects(f"/api/v1/namespaces/{NAMESPACE}/configmaps") == []
    assert after.phase is Phase.LOST


async def test_after_a_restart_a_run_launched_without_a_saved_handle_is_found(
    kube_api: KubeApiServer, results: FakeResults
) -> None:
    _queue(kube_api, NAMESPACE)
    spec = _spec()
    await _backend(kube_api, results).launch(spec)
    restarted = _backend(kube_api, results)

    found = await restarted.recover(RunHandle(backend="kubernetes", run_id=spec.run_id))
    never = await restarted.recover(RunHandle(backend="kubernetes", run_id=uuid.uuid4()))

    assert found.phase is Phase.RUNNING
    assert found.handle is not None
    assert found.handle.details["kind"] == "Job"
    assert found.handle.details["cluster"] == "default"
    assert never.phase is Phase.NOT_STARTED


async def test_after_a_restart_a_run_whose_objects_expired_is_read_from_mlflow(
    kube_api: KubeApiServer, results: FakeResults
) -> None:
    _queue(kube_api, NAMESPACE)
    backend = _backend(kube_api, results)
    spec, lost = _spec(), _spec()
    handles = [await backend.launch(spec), await backend.launch(lost)]
    for run in (spec, lost):
        kube_api.delete(JOB.path(NAMESPACE, _name(run)))  # its TTL ran out
    results.register(spec.run_id)

    statuses = [await _backend(kube_api, results).recover(h) for h in handles]

    assert [s.phase for s in statuses] == [Phase.SUCCEEDED, Phase.LOST]


async def test_several_workers_run_as_a_pytorchjob(
    kube_api: KubeApiServer, results: FakeResults, crds: dict[tuple[str, str], CrdSchema]
) -> None:
    _queue(kube_api, NAMESPACE)
    backend = _backend(kube_api, results, workers=3, gpu={"mode": "full"})
    spec = _spec()
    path = PYTORCH_JOB.path(NAMESPACE, _name(spec))

    handle = await backend.launch(spec)

    job = kube_api.get(path)
    assert job is not None
    validate_manifest(_as_applied(job), crds=crds)
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    assert job["spec"]["runPolicy"]["suspend"] is True
    assert handle.details["kind"] == "PyTorchJob"

    master, worker = f"{_name(spec)}-master-0", f"{_name(spec)}-worker-1"
    _pod(kube_api, spec, name=master, role="master", container="pytorch", exit_code=137)
    _pod(kube_api, spec, name=worker, role="worker", container="pytorch", exit_code=1)
    kube_api.set_log(NAMESPACE, master, "rank 0\nKilled\n")
    _condition(kube_api, path, "Failed", reason="PyTorchJobFailed", message="master failed")
    failed = await backend.poll(handle)

    assert failed.phase is Phase.FAILED
    assert failed.exit_code == 137  # the master's, before a worker's
    assert failed.log_tail.endswith("rank 0\nKilled")
    assert await backend.read_log(handle) == "rank 0\nKilled\n"


async def test_a_pytorchjob_succeeds_on_its_succeeded_condition(
    kube_api: KubeApiServer, results: FakeResults
) -> None:
    _queue(kube_api, NAMESPACE)
    backend = _backend(kube_api, results, workers=2)
    spec = _spec()
    handle = await backend.launch(spec)
    path = PYTORCH_JOB.path(NAMESPACE, _name(spec))
    kube_api.set_status(
        path,
        {
            "conditions": [{"type": "Running", "status": "True"}],
            "replicaStatuses": {"Master": {"active": 1}},
        },
    )
    running = await backend.poll(handle)
    results.register(spec.run_id)
    kube_api.set_status(
        path,
        {
            "conditions": [
                {"type": "Running", "status": "False"},
                {"type": "Succeeded", "status": "True"},
            ]
        },
    )

    done = await backend.poll(handle)

    assert running.phase is Phase.RUNNING
    assert done.phase is Phase.SUCCEEDED


def _two_clusters(kube_api: KubeApiServer) -> list[dict[str, Any]]:
    """A private cluster with an A100 flavor and a public one with an L4 flavor."""
    connection = {"host": kube_api.url}
    return [
        {
            "name": "onprem",
            "namespace": "onprem",
            "connection": connection,
            "flavors": [{"name": "a100", "node_labels": {"gpu": "a100"}}],
        },
        {
            "name": "cloud",
            "pool": "public",
            "namespace": "cloud",
            "connection": connection,
            "flavors": [{"name": "l4", "cost": "standard"}],
        },
    ]


async def test_placement_bursts_a_burstable_run_and_records_why(
    kube_api: KubeApiServer, results: FakeResults
) -> None:
    _queue(kube_api, "onprem", pending=9, admitted=1)
    _queue(kube_api, "cloud")
    backend = _backend(
        kube_api,
        results,
        clusters=_two_clusters(kube_api),
        labels={"app.kubernetes.io/instance": "flywheel"},
        placement={"drift": {"priority_class": "flywheel-production-retrain"}},
    )
    drift, manual = _spec(priority=Priority.DRIFT), _spec(priority=Priority.MANUAL)

    burst = await backend.launch(drift)
    waits = await backend.launch(manual)

    decision = burst.details["placement"]["decision"]
    assert (decision["cluster"], decision["flavor"], decision["pool"]) == ("cloud", "l4", "public")
    assert decision["on_time"]
    inputs = burst.details["placement"]["inputs"]
    assert inputs["priority"] == "drift"
    assert inputs["request"]["burstable"]
    assert {o["cluster"]: o["queue_delay_s"] for o in inputs["options"]} == {
        "onprem": 18000.0,
        "cloud": 0.0,
    }
    cloud = kube_api.get(JOB.path("cloud", _name(drift)))
    assert cloud is not None
    labels = cloud["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/priority-class"] == "flywheel-production-retrain"
    assert labels["app.kubernetes.io/instance"] == "flywheel"
    pod_labels = cloud["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["app.kubernetes.io/instance"] == "flywheel"
    assert pod_labels["app.kubernetes.io/component"] == "training"
    assert waits.details["placement"]["decision"]["cluster"] == "onprem"
    assert not waits.details["placement"]["decision"]["on_time"]
    onprem = kube_api.get(JOB.path("onprem", _name(manual)))
    assert onprem is not None
    assert "kueue.x-k8s.io/priority-class" not in onprem["metadata"]["labels"]
    assert onprem["spec"]["template"]["spec"]["nodeSelector"] == {"gpu": "a100"}
    annotation = json.loads(onprem["metadata"]["annotations"]["flywheel.dev/placement"])
    assert annotation["cluster"] == "onprem"


async def test_a_run_is_watched_on_the_cluster_it_was_placed_on(
    kube_api: KubeApiServer, results: FakeResults
) -> None:
    _queue(kube_api, "onprem", pending=9)
    _queue(kube_api, "cloud")
    backend = _backend(kube_api, results, clusters=_two_clusters(kube_api))
    spec = _spec(priority=Priority.DRIFT)
    handle = await backend.launch(spec)
    results.register(spec.run_id)
    _condition(kube_api, JOB.path("cloud", _name(spec)), "Complete")

    status: RunStatus = await backend.poll(handle)

    assert status.phase is Phase.SUCCEEDED
    await backend.aclose()
    assert results.closed


async def test_a_running_runs_log_is_read_again_only_every_log_refresh_s(
    kube_api: KubeApiServer, results: FakeResults
) -> None:
    _queue(kube_api, NAMESPACE)
    backend = _backend(kube_api, results, step_s=10.0)  # log_refresh_s is 30
    spec = _spec()
    handle = await backend.launch(spec)
    pod = f"{_name(spec)}-p"
    _pod(kube_api, spec, name=pod)
    kube_api.set_status(JOB.path(NAMESPACE, _name(spec)), {"active": 1})
    kube_api.set_log(NAMESPACE, pod, "epoch 0\n")

    tails = []
    for epoch in range(1, 5):
        tails.append((await backend.poll(handle)).log_tail)
        kube_api.set_log(NAMESPACE, pod, f"epoch {epoch}\n")

    assert tails == ["epoch 0", "epoch 0", "epoch 0", "epoch 3"]
    assert len(kube_api.requests_to("GET", "/log")) == 2


async def test_a_run_on_a_cluster_the_settings_dropped_is_lost_not_an_error(
    kube_api: KubeApiServer, results: FakeResults
) -> None:
    handle = RunHandle(
        backend="kubernetes",
        run_id=uuid.uuid4(),
        details={"cluster": "gone", "namespace": NAMESPACE, "kind": "Job", "name": "x"},
    )
    backend = _backend(kube_api, results)

    polled = await backend.poll(handle)
    recovered = await backend.recover(handle)

    assert polled.phase is Phase.LOST
    assert recovered.phase is Phase.NOT_STARTED  # nowhere in the clusters it knows
    assert await backend.read_log(handle) is None
