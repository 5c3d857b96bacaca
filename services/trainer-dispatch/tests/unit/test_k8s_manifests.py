import json
import uuid
from typing import Any

import pytest
from pydantic import SecretStr

from flywheel_runtime.settings import PlatformSettings
from flywheel_testing.kube import CrdSchema, load_crd_schemas, validate_manifest
from flywheel_trainer_dispatch.adapters import k8s_manifests as manifests
from flywheel_trainer_dispatch.adapters.local import TrainingOptions, build_command
from flywheel_trainer_dispatch.ports import RunSpec
from flywheel_trainer_dispatch.settings import GpuSettings

RUN_ID = uuid.UUID("00000000-0000-4000-8000-0000000000aa")
SPEC = RunSpec(
    run_id=RUN_ID,
    project_id="digits",
    model_line="digits-classifier",
    snapshot_id="snap-1",
    registered_model="digits-classifier",
    correlation_id=uuid.UUID("00000000-0000-4000-8000-0000000000cc"),
)
EXCLUDING = SPEC.model_copy(update={"excluded_label_ids": (uuid.UUID(int=1), uuid.UUID(int=2))})
PLATFORM = PlatformSettings(
    s3_endpoint="minio.flywheel:9000",
    s3_access_key=SecretStr("access-key-1"),
    s3_secret_key=SecretStr("secret-key-1"),
    mlflow_uri="http://mlflow.flywheel:5000",
    database_url=SecretStr("postgresql+asyncpg://u:db-password@db/flywheel"),
    rabbit_url=SecretStr("amqp://u:rabbit-password@rabbit/"),
)
OPTIONS = TrainingOptions(threads_per_process=2, epochs=2)
TARGET = manifests.PodTarget(
    namespace="flywheel",
    image="registry.local/flywheel-trainer:1",
    service_account="flywheel-training",
    queue_name="flywheel-training",
    priority_class="retrain-high",
    secret_env={
        "FLYWHEEL_S3_ACCESS_KEY": ("flywheel-s3", "access-key"),
        "FLYWHEEL_S3_SECRET_KEY": ("flywheel-s3", "secret-key"),
    },
    env_from_secrets=("flywheel-mlflow",),
    active_deadline_s=3600,
    termination_grace_s=5,
)


@pytest.fixture(scope="module")
def crds() -> dict[tuple[str, str], CrdSchema]:
    try:
        return load_crd_schemas()
    except FileNotFoundError as error:
        pytest.skip(f"CRD checks skipped: {error}")


def _pod(workload: dict[str, Any], role: str = "Master") -> dict[str, Any]:
    if workload["kind"] == "Job":
        spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    else:
        spec = workload["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]
    return spec


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_one_pod_is_a_kueue_queued_batch_job_that_passes_the_strict_schema() -> None:
    run = manifests.run_objects(SPEC, TARGET, OPTIONS, PLATFORM, placement={"cluster": "a"})

    job = run.workload
    validate_manifest(job)
    assert run.resource.kind == "Job"
    assert run.config_map is None
    assert job["metadata"]["name"] == f"flywheel-train-{RUN_ID}"
    labels = job["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "flywheel-training"
    assert labels["kueue.x-k8s.io/priority-class"] == "retrain-high"
    assert labels["flywheel.dev/run-id"] == str(RUN_ID)
    assert labels["flywheel.dev/model-line"] == "digits-classifier"
    assert json.loads(job["metadata"]["annotations"]["flywheel.dev/placement"]) == {"cluster": "a"}
    assert job["spec"]["suspend"] is True
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["ttlSecondsAfterFinished"] == 86400
    assert job["spec"]["activeDeadlineSeconds"] == 3600
    template = job["spec"]["template"]
    assert template["metadata"]["labels"]["flywheel.dev/run-id"] == str(RUN_ID)
    assert "kueue.x-k8s.io/queue-name" not in template["metadata"]["labels"]
    pod = template["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "flywheel-training"
    assert pod["terminationGracePeriodSeconds"] == 5
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_pod_runs_the_same_command_as_the_local_backend() -> None:
    run = manifests.run_objects(SPEC, TARGET, OPTIONS, PLATFORM)

    (container,) = _pod(run.workload)["containers"]
    local = build_command(SPEC, OPTIONS, python="python", result_file=manifests.RESULT_FILE)
    assert container["command"] == local == run.command
    assert container["command"][:3] == ["python", "-m", "flywheel_vision.train"]


def test_credentials_are_secret_references_and_no_secret_value_is_written() -> None:
    run = manifests.run_objects(SPEC, TARGET, OPTIONS, PLATFORM)

    (container,) = _pod(run.workload)["containers"]
    env = _env(container)
    assert env["FLYWHEEL_S3_ACCESS_KEY"] == {
        "secretKeyRef": {"name": "flywheel-s3", "key": "access-key"}
    }
    assert env["FLYWHEEL_S3_SECRET_KEY"] == {
        "secretKeyRef": {"name": "flywheel-s3", "key": "secret-key"}
    }
    assert env["FLYWHEEL_S3_ENDPOINT"] == "minio.flywheel:9000"
    assert env["FLYWHEEL_MLFLOW_URI"] == "http://mlflow.flywheel:5000"
    assert env["OMP_NUM_THREADS"] == "2"
    assert container["envFrom"] == [{"secretRef": {"name": "flywheel-mlflow"}}]
    text = json.dumps(run.workload)
    for secret in ("access-key-1", "secret-key-1", "db-password", "rabbit-password"):
        assert secret not in text
    assert "FLYWHEEL_DATABASE_URL" not in text
    assert "FLYWHEEL_RABBIT_URL" not in text


def test_without_a_queue_the_job_starts_at_once() -> None:
    target = manifests.PodTarget(namespace="flywheel", image="img:1", queue_name=None)

    job = manifests.run_objects(SPEC, target, OPTIONS, PLATFORM).workload

    validate_manifest(job)
    assert "suspend" not in job["spec"]
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]
    assert "kueue.x-k8s.io/priority-class" not in job["metadata"]["labels"]


def test_several_processes_in_one_pod_run_torchrun_standalone() -> None:
    target = manifests.PodTarget(namespace="flywheel", image="img:1", nproc_per_node=2)

    job = manifests.run_objects(SPEC, target, OPTIONS, PLATFORM).workload

    (container,) = _pod(job)["containers"]
    assert container["command"][:6] == [
        "python",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
    ]


def test_several_pods_are_a_pytorchjob_that_passes_the_crd_schema(
    crds: dict[tuple[str, str], CrdSchema],
) -> None:
    target = manifests.PodTarget(
        namespace="flywheel",
        image="img:1",
        queue_name="flywheel-training",
        workers=3,
        gpu_resource="nvidia.com/gpu",
        gpu_count=1,
    )

    run = manifests.run_objects(SPEC, target, OPTIONS, PLATFORM)

    job = run.workload
    validate_manifest(job, crds=crds)
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 2)
    assert job["spec"]["runPolicy"]["suspend"] is True
    assert job["spec"]["runPolicy"]["cleanPodPolicy"] == "None"
    assert job["spec"]["nprocPerNode"] == "1"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "flywheel-training"
    for role in ("Master", "Worker"):
        (container,) = _pod(job, role)["containers"]
        assert container["name"] == "pytorch"
        assert container["ports"] == [
            {"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"}
        ]
        # One process per pod: the operator's MASTER_ADDR/RANK/WORLD_SIZE are torchrun's.
        assert container["command"][:3] == ["python", "-m", "flywheel_vision.train"]
    master_labels = replicas["Master"]["template"]["metadata"]["labels"]
    assert master_labels["flywheel.dev/role"] == "master"


def test_several_processes_per_pod_join_through_the_operators_variables(
    crds: dict[tuple[str, str], CrdSchema],
) -> None:
    target = manifests.PodTarget(namespace="flywheel", image="img:1", workers=2, nproc_per_node=4)

    job = manifests.run_objects(SPEC, target, OPTIONS, PLATFORM).workload

    validate_manifest(job, crds=crds)
    assert job["spec"]["nprocPerNode"] == "4"
    (container,) = _pod(job, "Worker")["containers"]
    command = container["command"]
    assert command[: command.index("flywheel_vision.train") + 1] == [
        "python",
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--node_rank=$(RANK)",
        "--master_addr=$(MASTER_ADDR)",
        "--master_port=$(MASTER_PORT)",
        "--nproc_per_node=4",
        "-m",
        "flywheel_vision.train",
    ]


@pytest.mark.parametrize(
    ("gpu", "resource"),
    [
        (GpuSettings(mode="full", count=2), "nvidia.com/gpu"),
        (GpuSettings(mode="mig", mig_profile="3g.40gb"), "nvidia.com/mig-3g.40gb"),
        (
            GpuSettings(mode="shared", shared_resource="nvidia.com/gpu.shared"),
            "nvidia.com/gpu.shared",
        ),
    ],
)
def test_gpus_are_requested_by_allocation_mode(gpu: GpuSettings, resource: str) -> None:
    target = manifests.PodTarget(
        namespace="flywheel",
        image="img:1",
        gpu_resource=gpu.resource(),
        gpu_count=gpu.count,
        node_selector={"cloud.google.com/gke-accelerator": "nvidia-a100-80gb"},
    )

    job = manifests.run_objects(SPEC, target, OPTIONS, PLATFORM).workload

    validate_manifest(job)
    pod = _pod(job)
    (container,) = pod["containers"]
    assert container["resources"]["limits"][resource] == str(gpu.count)
    assert container["resources"]["requests"][resource] == str(gpu.count)
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-a100-80gb"}


def test_without_gpus_nothing_gpu_is_asked_for() -> None:
    assert GpuSettings().resource() is None
    job = manifests.run_objects(SPEC, TARGET, OPTIONS, PLATFORM).workload

    pod = _pod(job)
    assert "tolerations" not in pod
    assert set(pod["containers"][0]["resources"]["limits"]) == {"cpu", "memory"}


def test_excluded_labels_travel_in_a_config_map_the_pods_mount() -> None:
    run = manifests.run_objects(EXCLUDING, TARGET, OPTIONS, PLATFORM)

    assert run.config_map is not None
    validate_manifest(run.config_map)
    assert json.loads(run.config_map["data"]["excluded-labels.json"]) == [
        str(uuid.UUID(int=1)),
        str(uuid.UUID(int=2)),
    ]
    pod = _pod(run.workload)
    (container,) = pod["containers"]
    command = container["command"]
    path = command[command.index("--exclude-labels-file") + 1]
    assert path == "/var/run/flywheel/excluded-labels.json"
    assert {"name": "excluded-labels", "mountPath": "/var/run/flywheel", "readOnly": True} in (
        container["volumeMounts"]
    )
    assert {"name": "excluded-labels", "configMap": {"name": f"flywheel-train-{RUN_ID}"}} in (
        pod["volumes"]
    )


def test_too_many_excluded_labels_for_a_config_map_are_refused() -> None:
    many = SPEC.model_copy(
        update={"excluded_label_ids": tuple(uuid.UUID(int=i) for i in range(30_000))}
    )

    with pytest.raises(manifests.ManifestError, match="do not fit in a ConfigMap"):
        manifests.run_objects(many, TARGET, OPTIONS, PLATFORM)


def test_values_that_are_not_valid_labels_stay_in_annotations_only() -> None:
    odd = SPEC.model_copy(update={"model_line": "x" * 64, "project_id": "ok"})

    job = manifests.run_objects(odd, TARGET, OPTIONS, PLATFORM).workload

    validate_manifest(job)
    assert "flywheel.dev/model-line" not in job["metadata"]["labels"]
    assert job["metadata"]["annotations"]["flywheel.dev/model-line"] == "x" * 64


def test_names_come_from_the_run_id_and_fit_a_label() -> None:
    name = manifests.object_name(RUN_ID)

    assert name == manifests.object_name(uuid.UUID(str(RUN_ID)))
    assert len(name) <= 63
    assert manifests.label_value(name) == name


def test_the_owner_reference_points_at_the_created_workload() -> None:
    job = manifests.run_objects(SPEC, TARGET, OPTIONS, PLATFORM).workload
    job["metadata"]["uid"] = "uid-1"

    assert manifests.owner_reference(job) == {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": f"flywheel-train-{RUN_ID}",
        "uid": "uid-1",
        "blockOwnerDeletion": False,
    }
