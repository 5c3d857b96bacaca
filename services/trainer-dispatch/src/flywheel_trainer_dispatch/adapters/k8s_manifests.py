"""The objects of a Kubernetes training run, as plain dicts: pure functions, no I/O.

One pod is a batch ``Job``; several are a Kubeflow ``PyTorchJob`` (``kubeflow.org/v1``) with one
Master and ``workers - 1`` Workers. Each pod runs the same entry point as the local backend,
with the same arguments (``build_command``):

* one process per pod: ``python -m flywheel_vision.train …``. In a PyTorchJob the operator puts
  ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE`` and ``RANK`` in each pod, which is exactly
  the torchrun environment ``flywheel_vision.ddp.init`` reads;
* several processes per pod: ``torchrun`` (``python -m torch.distributed.run``) — standalone in
  a Job, and in a PyTorchJob told the node count and its rank and master through ``$(VAR)``
  references the kubelet expands from the operator's variables.

Names come from the run id (``flywheel-train-<run id>``), so creating twice finds the first
object. With a Kueue queue the object carries ``kueue.x-k8s.io/queue-name`` (and the priority
class) and is created suspended; Kueue resumes it when admitted, and the flavor's node labels
in the node selector keep Kueue to the flavor the placement chose. Credentials come from
Secrets by reference: no secret value is ever written into a manifest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import Any, Final

from flywheel_clients.kubernetes import CONFIG_MAP, JOB, PYTORCH_JOB, Resource
from flywheel_runtime.settings import PlatformSettings
from flywheel_trainer_dispatch.adapters.local import TrainingOptions, build_command
from flywheel_trainer_dispatch.ports import RunSpec

NAME_PREFIX: Final = "flywheel-train-"
RUN_ID_LABEL: Final = "flywheel.dev/run-id"
ROLE_LABEL: Final = "flywheel.dev/role"
QUEUE_LABEL: Final = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL: Final = "kueue.x-k8s.io/priority-class"
PLACEMENT_ANNOTATION: Final = "flywheel.dev/placement"

JOB_CONTAINER: Final = "trainer"
PYTORCH_CONTAINER: Final = "pytorch"
"""The container the Kubeflow operator configures (its fixed default name)."""
PYTORCH_PORT: Final = 23456
PYTORCH_PORT_NAME: Final = "pytorchjob-port"

PYTHON: Final = "python"
EXCLUDED_DIR: Final = PurePosixPath("/var/run/flywheel")
EXCLUDED_KEY: Final = "excluded-labels.json"
POD_TMP: Final = "/tmp"  # noqa: S108 - an emptyDir of the pod's own
POD_SHM: Final = "/dev/shm"  # noqa: S108 - a memory-backed emptyDir of the pod's own
RESULT_FILE: Final = PurePosixPath(POD_TMP, "flywheel", "result.json")
"""Where rank 0 writes its result inside the pod; the dispatcher reads the result from MLflow."""

CONFIG_MAP_LIMIT: Final = 900 * 1024
"""A ConfigMap holds at most 1 MiB; the excluded labels must fit with room to spare."""

RUN_USER: Final = 10001
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


class ManifestError(ValueError):
    """The run cannot be expressed as Kubernetes objects (its excluded labels are too many)."""


@dataclass(frozen=True)
class PodTarget:
    """Everything about where and how a run's pods run, resolved for one cluster and flavor."""

    namespace: str
    image: str
    image_pull_policy: str = "IfNotPresent"
    service_account: str | None = None
    queue_name: str | None = None
    priority_class: str | None = None
    workers: int = 1
    nproc_per_node: int = 1
    cpu: str = "2"
    memory: str = "8Gi"
    gpu_resource: str | None = None
    """Extended resource of the GPUs (``nvidia.com/gpu``, ``nvidia.com/mig-1g.10gb``, …)."""
    gpu_count: int = 0
    node_selector: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    """Plain variables, over the platform's."""
    secret_env: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    """Variable → (Secret name, key)."""
    env_from_secrets: Sequence[str] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    """Further labels of the objects and pods (never overriding the run's own)."""
    ttl_after_finished_s: int = 86400
    backoff_limit: int = 0
    active_deadline_s: int | None = None
    termination_grace_s: int = 30

    @property
    def resource(self) -> Resource:
        return PYTORCH_JOB if self.workers > 1 else JOB

    @property
    def container(self) -> str:
        return PYTORCH_CONTAINER if self.workers > 1 else JOB_CONTAINER


@dataclass(frozen=True)
class RunObjects:
    """The objects to create for one run, in order."""

    workload: dict[str, Any]
    """The Job or PyTorchJob."""
    resource: Resource
    config_map: dict[str, Any] | None
    """The excluded labels, mounted into the pods; None when there are none."""
    command: list[str]


def object_name(run_id: object) -> str:
    """The name of a run's objects: the same every time, so a second create finds the first."""
    return f"{NAME_PREFIX}{run_id}"


def label_value(value: str) -> str | None:
    """``value`` when Kubernetes accepts it as a label value, else None (it goes in an
    annotation only)."""
    return value if len(value) <= 63 and _LABEL_VALUE.match(value) else None


def run_labels(spec: RunSpec, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Labels of every object and pod of a run; ``flywheel.dev/run-id`` finds them all, and
    ``app.kubernetes.io/component: training`` is what the chart's NetworkPolicies admit."""
    labels = {
        **(extra or {}),
        "app.kubernetes.io/name": "flywheel-training",
        "app.kubernetes.io/component": "training",
        "app.kubernetes.io/part-of": "flywheel",
        "app.kubernetes.io/managed-by": "flywheel-trainer-dispatch",
        RUN_ID_LABEL: str(spec.run_id),
    }
    for key, value in (
        ("flywheel.dev/project-id", spec.project_id),
        ("flywheel.dev/model-line", spec.model_line),
    ):
        if (checked := label_value(value)) is not None:
            labels[key] = checked
    return labels


def run_annotations(spec: RunSpec, placement: Mapping[str, Any] | None) -> dict[str, str]:
    annotations = {
        "flywheel.dev/project-id": spec.project_id,
        "flywheel.dev/model-line": spec.model_line,
        "flywheel.dev/snapshot-id": spec.snapshot_id,
        "flywheel.dev/registered-model": spec.registered_model,
        "flywheel.dev/correlation-id": str(spec.correlation_id),
    }
    if placement is not None:
        annotations[PLACEMENT_ANNOTATION] = json.dumps(placement, sort_keys=True)
    return annotations


def gpu_tolerations(target: PodTarget) -> list[dict[str, str]]:
    """GPU node pools are commonly tainted ``nvidia.com/gpu``; tolerate it when asking for
    GPUs (Kueue adds a flavor's own tolerations on admission)."""
    if target.gpu_resource is None or target.gpu_count < 1:
        return []
    return [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def resources(target: PodTarget) -> dict[str, dict[str, str]]:
    """Requests equal to limits (guaranteed QoS; extended resources require it)."""
    amounts = {"cpu": target.cpu, "memory": target.memory}
    if target.gpu_resource is not None and target.gpu_count > 0:
        amounts[target.gpu_resource] = str(target.gpu_count)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def training_env(
    target: PodTarget, platform: PlatformSettings, options: TrainingOptions
) -> list[dict[str, Any]]:
    """The pod's variables: the platform's addresses (never its secrets), the target's own,
    and the credentials as Secret references."""
    plain = {
        "FLYWHEEL_S3_ENDPOINT": platform.s3_endpoint,
        "FLYWHEEL_S3_SECURE": str(platform.s3_secure).lower(),
        "FLYWHEEL_S3_REGION": platform.s3_region,
        "FLYWHEEL_MLFLOW_URI": platform.mlflow_uri,
        "FLYWHEEL_LOG_LEVEL": platform.log_level,
        "FLYWHEEL_LOG_JSON": str(platform.log_json).lower(),
        "FLYWHEEL_ENVIRONMENT": platform.environment,
        "OMP_NUM_THREADS": str(options.threads_per_process),
        "PYTHONUNBUFFERED": "1",
        # The root filesystem is read-only: caches and temporary files go to the emptyDir.
        "HOME": POD_TMP,
        "TMPDIR": POD_TMP,
    }
    plain.update(target.env)
    env: list[dict[str, Any]] = [
        {"name": name, "value": value}
        for name, value in plain.items()
        if name not in target.secret_env
    ]
    env += [
        {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
        for name, (secret, key) in target.secret_env.items()
    ]
    return env


def commands(spec: RunSpec, target: PodTarget, options: TrainingOptions) -> list[str]:
    """The training command of every pod of the run (processes per pod: the target's)."""
    # The run's entry point and hyperparameters; its process count is the target's.
    single = replace(options.for_run(spec), nproc_per_node=1, model_lines={})
    spec = spec.model_copy(update={"nproc_per_node": None})
    excluded = EXCLUDED_DIR / EXCLUDED_KEY if spec.excluded_label_ids else None
    train = build_command(
        spec,
        single,
        python=PYTHON,
        result_file=RESULT_FILE,
        excluded_file=excluded,
    )
    module_and_arguments = train[1:]  # "-m flywheel_vision.train …"
    if target.nproc_per_node == 1:
        return train
    if target.workers == 1:
        launcher = ["--standalone"]
    else:
        launcher = [
            f"--nnodes={target.workers}",
            "--node_rank=$(RANK)",
            "--master_addr=$(MASTER_ADDR)",
            "--master_port=$(MASTER_PORT)",
        ]
    return [
        PYTHON,
        "-m",
        "torch.distributed.run",
        *launcher,
        f"--nproc_per_node={target.nproc_per_node}",
        *module_and_arguments,
    ]


def pod_template(
    spec: RunSpec,
    target: PodTarget,
    options: TrainingOptions,
    platform: PlatformSettings,
    *,
    role: str,
    command: list[str],
) -> dict[str, Any]:
    """The pod of one role (``trainer``, ``master`` or ``worker``), hardened."""
    container: dict[str, Any] = {
        "name": target.container,
        "image": target.image,
        "imagePullPolicy": target.image_pull_policy,
        "command": command,
        "env": training_env(target, platform, options),
        "resources": resources(target),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "tmp", "mountPath": POD_TMP},
            {"name": "dshm", "mountPath": POD_SHM},
        ],
    }
    if target.env_from_secrets:
        container["envFrom"] = [{"secretRef": {"name": name}} for name in target.env_from_secrets]
    if target.workers > 1:
        container["ports"] = [
            {"name": PYTORCH_PORT_NAME, "containerPort": PYTORCH_PORT, "protocol": "TCP"}
        ]
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {}},
        # DataLoader workers and NCCL share tensors through /dev/shm; the runtime's 64 MiB is
        # too small for either.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    if spec.excluded_label_ids:
        container["volumeMounts"].append(
            {"name": "excluded-labels", "mountPath": str(EXCLUDED_DIR), "readOnly": True}
        )
        volumes.append({"name": "excluded-labels", "configMap": {"name": object_name(spec.run_id)}})
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": target.termination_grace_s,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_USER,
            "runAsGroup": RUN_USER,
            "fsGroup": RUN_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if target.service_account:
        pod["serviceAccountName"] = target.service_account
    if target.node_selector:
        pod["nodeSelector"] = dict(target.node_selector)
    if tolerations := gpu_tolerations(target):
        pod["tolerations"] = tolerations
    labels = run_labels(spec, target.labels) | {ROLE_LABEL: role}
    return {"metadata": {"labels": labels}, "spec": pod}


def _metadata(
    spec: RunSpec, target: PodTarget, placement: Mapping[str, Any] | None
) -> dict[str, Any]:
    labels = run_labels(spec, target.labels)
    if target.queue_name:
        labels[QUEUE_LABEL] = target.queue_name
        if target.priority_class:
            labels[PRIORITY_LABEL] = target.priority_class
    return {
        "name": object_name(spec.run_id),
        "namespace": target.namespace,
        "labels": labels,
        "annotations": run_annotations(spec, placement),
    }


def batch_job(
    spec: RunSpec,
    target: PodTarget,
    options: TrainingOptions,
    platform: PlatformSettings,
    *,
    placement: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``batch/v1`` Job running the run in one pod."""
    job_spec: dict[str, Any] = {
        "completions": 1,
        "parallelism": 1,
        "backoffLimit": target.backoff_limit,
        "ttlSecondsAfterFinished": target.ttl_after_finished_s,
        "template": pod_template(
            spec,
            target,
            options,
            platform,
            role=JOB_CONTAINER,
            command=commands(spec, target, options),
        ),
    }
    if target.queue_name:
        job_spec["suspend"] = True  # Kueue resumes it on admission
    if target.active_deadline_s is not None:
        job_spec["activeDeadlineSeconds"] = target.active_deadline_s
    return {
        "apiVersion": JOB.api_version,
        "kind": JOB.kind,
        "metadata": _metadata(spec, target, placement),
        "spec": job_spec,
    }


def pytorch_job(
    spec: RunSpec,
    target: PodTarget,
    options: TrainingOptions,
    platform: PlatformSettings,
    *,
    placement: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``kubeflow.org/v1`` PyTorchJob: one Master and ``workers - 1`` Workers."""
    command = commands(spec, target, options)
    run_policy: dict[str, Any] = {
        "backoffLimit": target.backoff_limit,
        "ttlSecondsAfterFinished": target.ttl_after_finished_s,
        # Pods stay after the end (until the TTL), so their logs can still be read.
        "cleanPodPolicy": "None",
    }
    if target.queue_name:
        run_policy["suspend"] = True
    if target.active_deadline_s is not None:
        run_policy["activeDeadlineSeconds"] = target.active_deadline_s
    replicas = {
        "Master": {
            "replicas": 1,
            "restartPolicy": "Never",
            "template": pod_template(
                spec, target, options, platform, role="master", command=command
            ),
        }
    }
    if target.workers > 1:
        replicas["Worker"] = {
            "replicas": target.workers - 1,
            "restartPolicy": "Never",
            "template": pod_template(
                spec, target, options, platform, role="worker", command=command
            ),
        }
    return {
        "apiVersion": PYTORCH_JOB.api_version,
        "kind": PYTORCH_JOB.kind,
        "metadata": _metadata(spec, target, placement),
        "spec": {
            "runPolicy": run_policy,
            "nprocPerNode": str(target.nproc_per_node),
            "pytorchReplicaSpecs": replicas,
        },
    }


def excluded_labels_config_map(spec: RunSpec, target: PodTarget) -> dict[str, Any] | None:
    """The labels the run must leave out, as the file the pods mount; None when none."""
    if not spec.excluded_label_ids:
        return None
    data = json.dumps([str(i) for i in spec.excluded_label_ids])
    if len(data) > CONFIG_MAP_LIMIT:
        raise ManifestError(
            f"{len(spec.excluded_label_ids)} excluded labels do not fit in a ConfigMap "
            f"({len(data)} bytes, at most {CONFIG_MAP_LIMIT})"
        )
    return {
        "apiVersion": CONFIG_MAP.api_version,
        "kind": CONFIG_MAP.kind,
        "metadata": {
            "name": object_name(spec.run_id),
            "namespace": target.namespace,
            "labels": run_labels(spec, target.labels),
        },
        "data": {EXCLUDED_KEY: data},
    }


def owner_reference(workload: Mapping[str, Any]) -> dict[str, Any]:
    """A reference making an object go when the workload goes (its TTL, a cancel)."""
    metadata = workload["metadata"]
    return {
        "apiVersion": workload["apiVersion"],
        "kind": workload["kind"],
        "name": metadata["name"],
        "uid": metadata["uid"],
        "blockOwnerDeletion": False,
    }


def run_objects(
    spec: RunSpec,
    target: PodTarget,
    options: TrainingOptions,
    platform: PlatformSettings,
    *,
    placement: Mapping[str, Any] | None = None,
) -> RunObjects:
    """Every object of a run, for the target the placement chose."""
    build = pytorch_job if target.workers > 1 else batch_job
    workload = build(spec, target, options, platform, placement=placement)
    return RunObjects(
        workload=workload,
        resource=target.resource,
        config_map=excluded_labels_config_map(spec, target),
        command=commands(spec, target, options),
    )
