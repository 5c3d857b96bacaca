"""The trainer dispatch's settings: one object, built once in ``create_app``."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from flywheel_clients.kubernetes import KubeConnection
from flywheel_runtime.auth import AuthSettings
from flywheel_runtime.settings import ServiceSettings
from flywheel_runtime.storage import DATA_BUCKET
from flywheel_trainer_dispatch.placement import Budget, Pool
from flywheel_trainer_dispatch.scheduler import Priority
from flywheel_vision.entrypoints import DEFAULT_ENTRY_POINT, EntryPoint, EntryPointError

SERVICE = "trainer-dispatch"
"""Service name: queue prefix, idempotency consumer, telemetry resource."""


_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
"""A DNS-1123 label: namespaces, queues, service accounts, cluster names."""


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class GpuSettings(_Block):
    """GPUs of each training pod, by the way the cluster hands them out."""

    mode: Literal["none", "full", "mig", "shared"] = "none"
    """``full``: whole GPUs (``nvidia.com/gpu``); ``mig``: a MIG slice
    (``nvidia.com/mig-<profile>``); ``shared``: a time-sliced share (``shared_resource``)."""

    count: int = Field(default=1, ge=1)
    """GPUs (or slices, or shares) per pod."""

    mig_profile: str = Field(default="1g.10gb", pattern=r"^[0-9]+g\.[0-9]+gb(\+me)?$")
    """MIG profile of ``mig`` mode, as the device plugin's mixed strategy names it."""

    shared_resource: str = Field(
        default="nvidia.com/gpu.shared", pattern=r"^[a-z0-9.-]+/[A-Za-z0-9._-]+$"
    )
    """Extended resource of ``shared`` mode (the device plugin's time-slicing rename)."""

    def resource(self) -> str | None:
        """The extended resource name to request; None without GPUs."""
        if self.mode == "full":
            return "nvidia.com/gpu"
        if self.mode == "mig":
            return f"nvidia.com/mig-{self.mig_profile}"
        if self.mode == "shared":
            return self.shared_resource
        return None


_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
_DATA_KEY = r"^[-._a-zA-Z0-9]+$"


class TrainingSecrets(_Block):
    """Secrets a training pod reads its credentials from (never copied into manifests)."""

    s3_secret: str = Field(default="flywheel-platform", pattern=_DNS_SUBDOMAIN, max_length=253)
    """Secret holding the S3 credentials of the training pods (the chart's platform Secret)."""

    s3_access_key_key: str = Field(default="s3-access-key", pattern=_DATA_KEY)
    """Its key holding the access key (``FLYWHEEL_S3_ACCESS_KEY`` in the pod)."""

    s3_secret_key_key: str = Field(default="s3-secret-key", pattern=_DATA_KEY)
    """Its key holding the secret key (``FLYWHEEL_S3_SECRET_KEY`` in the pod)."""

    env_from: list[str] = Field(default_factory=list)
    """Further Secrets whose every key becomes a variable (an MLflow token, say)."""


class PlacementClass(_Block):
    """What a run of one priority may use and how soon it should be done."""

    burstable: bool = False
    """May run in public (pay-per-use) pools when the private ones are too slow."""

    budget: Budget = Budget.STANDARD
    """Dearest flavor cost class it may use."""

    deadline_s: float | None = Field(default=None, gt=0)
    """Seconds from launch by which it should be done; unset: no deadline."""

    priority_class: str | None = Field(default=None, pattern=_NAME, max_length=63)
    """Kueue WorkloadPriorityClass of these runs; unset: the backend's ``priority_class``."""


class DriftPlacement(PlacementClass):
    """Drift: the model is going stale in production; worth paying to retrain soon."""

    burstable: bool = True
    """May run in public (pay-per-use) pools when the private ones are too slow."""

    budget: Budget = Budget.HIGH
    """Dearest flavor cost class it may use."""

    deadline_s: float | None = Field(default=7200.0, gt=0)
    """Seconds from launch by which it should be done; unset: no deadline."""


class ThresholdPlacement(PlacementClass):
    """Enough new labels: burst when the private pools are slow, at standard cost."""

    burstable: bool = True
    """May run in public (pay-per-use) pools when the private ones are too slow."""


class ManualPlacement(PlacementClass):
    """An operator's run: the cheap private pools only, unless configured otherwise."""

    budget: Budget = Budget.LOW
    """Dearest flavor cost class it may use."""


class PlacementSettings(_Block):
    """Placement of runs across clusters and Kueue flavors, per priority."""

    expected_run_s: float = Field(default=1800.0, gt=0)
    """Typical run duration, for queue delay estimates and deadlines."""

    burst_after_s: float = Field(default=900.0, ge=0)
    """Without a deadline: the longest private queue wait before a burstable run bursts."""

    drift: DriftPlacement = DriftPlacement()
    """Runs triggered by drift."""

    threshold: ThresholdPlacement = ThresholdPlacement()
    """Runs triggered by a label threshold (count, adaptive, max wait)."""

    scheduled: PlacementClass = PlacementClass()
    """Runs a timer or pipeline asked for."""

    manual: ManualPlacement = ManualPlacement()
    """Runs an operator asked for."""

    def for_priority(self, priority: Priority | None) -> PlacementClass:
        """The class of a run; a run of unknown priority is treated as manual."""
        classes = {
            Priority.DRIFT: self.drift,
            Priority.THRESHOLD: self.threshold,
            Priority.SCHEDULED: self.scheduled,
            Priority.MANUAL: self.manual,
        }
        return classes[priority or Priority.MANUAL]


class FlavorSettings(_Block):
    """A Kueue ResourceFlavor a run may be placed on."""

    name: str = Field(pattern=_NAME, max_length=63)
    """The ResourceFlavor's name (recorded with the placement)."""

    node_labels: dict[str, str] = Field(default_factory=dict)
    """The flavor's node labels, put in the pod's node selector so Kueue admits the run on
    this flavor only; empty: Kueue chooses among the queue's flavors."""

    cost: Budget = Budget.LOW
    """Cost class, matched against the run's budget (private pools are usually ``low``)."""

    gpu: GpuSettings | None = None
    """GPUs on this flavor; unset: the backend's ``gpu``."""


class ClusterSettings(_Block):
    """One cluster runs can be placed on."""

    name: str = Field(pattern=_NAME, max_length=63)
    """Name of the cluster in placements and run records; keep it stable."""
    pool: Pool = Pool.PRIVATE
    """``private``: capacity already paid for; ``public``: pay-per-use burst capacity."""
    connection: KubeConnection = KubeConnection()
    """How to reach its API server."""
    namespace: str | None = Field(default=None, pattern=_NAME, max_length=63)
    """Namespace of the runs there; unset: the backend's ``namespace``."""
    queue_name: str | None = Field(default=None, pattern=_NAME, max_length=63)
    """Kueue LocalQueue there; unset: the backend's ``queue_name``."""
    slots: int = Field(default=1, ge=1)
    """Runs the queue admits at once, for the queue delay estimate."""
    flavors: list[FlavorSettings] = Field(
        default_factory=lambda: [FlavorSettings(name="default")], min_length=1
    )
    env: dict[str, str] = Field(default_factory=dict)
    """Variables for runs there, over the backend's (an S3 endpoint reachable from it)."""


class KubernetesSettings(_Block):
    """The ``kubernetes`` backend: a batch Job per run, or a PyTorchJob for several pods."""

    connection: KubeConnection = KubeConnection()
    """The cluster, when ``clusters`` is empty."""

    namespace: str = Field(default="flywheel", pattern=_NAME, max_length=63)
    """Namespace the runs' objects are created in."""

    image: str = "ghcr.io/flywheel-mlops/flywheel-trainer:latest"
    """Image of the training pods (``deploy/docker/trainer.Dockerfile``; any image carrying
    ``flywheel_vision`` and ``python`` on its path will do)."""

    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """When the kubelet pulls the image (``Always`` for a moving tag)."""

    service_account: str | None = Field(default="flywheel-training", pattern=_NAME, max_length=253)
    """Service account of the training pods; unset: the namespace's default."""

    queue_name: str | None = Field(default="production", pattern=_NAME, max_length=63)
    """Kueue LocalQueue (``kueue.x-k8s.io/queue-name``); runs are created suspended and Kueue
    starts them when admitted. Unset: no Kueue, runs start at once."""

    priority_class: str | None = Field(default=None, pattern=_NAME, max_length=63)
    """Kueue WorkloadPriorityClass (``kueue.x-k8s.io/priority-class``); unset: none."""

    kueue_version: Literal["v1beta2", "v1beta1"] = "v1beta2"
    """API version the LocalQueues are read with (``v1beta1`` for Kueue before v1beta2)."""

    workers: int = Field(default=1, ge=1, le=64)
    """Pods per run: 1 is a batch Job; more is a Kubeflow PyTorchJob (a Master and
    ``workers - 1`` Workers), each pod running ``nproc_per_node`` processes."""

    cpu: str = Field(default="2", pattern=r"^[0-9]+(\.[0-9]+)?m?$")
    """CPU of each pod (request and limit)."""

    memory: str = Field(default="8Gi", pattern=r"^[0-9]+(\.[0-9]+)?([EPTGMK]i?|[mk])?$")
    """Memory of each pod (request and limit)."""

    gpu: GpuSettings = GpuSettings()
    """GPUs of each pod, unless the flavor says otherwise."""

    secrets: TrainingSecrets = TrainingSecrets()
    """Where the pods' credentials come from."""

    env: dict[str, str] = Field(default_factory=dict)
    """Further variables of every training pod."""

    labels: dict[str, str] = Field(default_factory=dict)
    """Further labels of every training object and pod (what a NetworkPolicy selects, such
    as ``app.kubernetes.io/instance``; cost tags)."""

    ttl_after_finished_s: int = Field(default=86400, ge=0)
    """A finished run's objects (and pods, with their logs) are deleted after this."""

    backoff_limit: int = Field(default=0, ge=0)
    """Pod retries of a run; 0: a failed pod fails the run (training.failed says whether to
    retry)."""

    log_refresh_s: float = Field(default=30.0, gt=0)
    """How often the log tail of a running run is read from its pod."""

    cancel_wait_s: float = Field(default=120.0, gt=0)
    """How long a cancel waits for the run's objects to be gone."""

    placement: PlacementSettings = PlacementSettings()
    """How runs are placed across clusters and flavors."""

    clusters: list[ClusterSettings] = Field(default_factory=list)
    """Clusters to place runs on, in order of preference; empty: one private cluster,
    ``default``, reached through ``connection``."""

    @model_validator(mode="after")
    def _unique_cluster_names(self) -> KubernetesSettings:
        names = [cluster.name for cluster in self.clusters]
        if len(names) != len(set(names)):
            raise ValueError("cluster names must be unique")
        return self

    def resolved_clusters(self) -> list[ClusterSettings]:
        return self.clusters or [ClusterSettings(name="default", connection=self.connection)]


def check_entry_point(spec: str | None) -> str | None:
    """``spec`` when it names a callable or a script (``flywheel_vision.entrypoints``)."""
    if spec is not None:
        try:
            EntryPoint.parse(spec)
        except EntryPointError as error:
            raise ValueError(error.message) from error
    return spec


class LineTraining(_Block):
    """How one model line trains, over the service-wide ``entry_point`` and hyperparameters."""

    entry_point: str | None = None
    """The line's training entry point: ``package.module:function`` or a script path (as the
    training processes see it: in the trainer image for the ``kubernetes`` backend; relative
    paths are taken from this service's working directory by the ``local`` backend). Unset:
    the service's ``entry_point``."""

    hyperparameters: dict[str, JsonValue] = Field(default_factory=dict)
    """The line's hyperparameters, over the service's (a key set in both takes the line's)."""

    nproc_per_node: int | None = Field(default=None, ge=1, le=64)
    """Training processes per node of the line's runs; unset: the service's."""

    _entry_point_parses = field_validator("entry_point")(check_entry_point)


class TrainerDispatchSettings(ServiceSettings):
    """Every field reads ``FLYWHEEL_TRAINER_DISPATCH_<FIELD>`` (nested fields with ``__``)."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_TRAINER_DISPATCH_",
        env_nested_delimiter="__",
        # One nested variable changes one field of a block and keeps the others' defaults.
        nested_model_default_partial_update=True,
        extra="ignore",
        use_attribute_docstrings=True,
    )

    http_port: int = 8083
    """Port of the service's HTTP server (API, health, metrics); unique per service locally."""

    namespace: str = ""
    """Prefix of every exchange and queue name; empty in production, unique per test run."""

    db_schema: str = Field(default="trainer_dispatch", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    """PostgreSQL schema owned by this service."""

    auth: AuthSettings | None = None
    """Bearer-token checks of the operator API; unset leaves the API open (local runs only).
    When set, reading needs any valid token and triggering or cancelling the ``operator``
    role."""

    backend: Literal["local", "kubernetes"] = "local"
    """Where training runs: ``local`` (a subprocess or torchrun on this machine) or
    ``kubernetes`` (a batch Job or a Kubeflow PyTorchJob, queued by Kueue)."""

    kubernetes: KubernetesSettings = KubernetesSettings()
    """The ``kubernetes`` backend."""

    instance_id: str = Field(default="", max_length=200)
    """This instance's name on the runs it starts; empty: the host name. After a restart an
    instance re-attaches the runs carrying its name, so it must stay the same across restarts
    (the host name does)."""

    runs_dir: Path = Path("trainer-dispatch-runs")
    """Directory of the local backend's per-run folders (log, result, excluded labels)."""

    data_bucket: str = DATA_BUCKET
    """Bucket holding the dataset snapshots that training reads."""

    registered_model_name: str = "{model_line}"
    """Registered model a run adds a version to; ``{model_line}`` and ``{project_id}`` are
    filled in. One registered model per model line."""

    max_concurrent_runs: int = Field(default=1, ge=1)
    """Runs in progress at once over all model lines and all instances; the rest wait."""

    nproc_per_node: int = Field(default=1, ge=1)
    """Training processes per run: above 1 the run is a torchrun DDP job."""

    threads_per_process: int | None = Field(default=None, ge=1)
    """Torch CPU threads of each training process; unset: the CPUs divided by the processes."""

    epochs: int = Field(default=3, ge=1)
    """Epochs of each training run."""

    batch_size: int = Field(default=128, ge=1)
    """Batch size per training process."""

    lr: float = Field(default=1e-3, gt=0)
    """Learning rate."""

    seed: int = 0
    """Seed of each run, so a retrain on the same snapshot repeats itself."""

    base_alias: str | None = "champion"
    """Registry alias of the version a run fine-tunes; unset trains every run from scratch."""

    entry_point: str = DEFAULT_ENTRY_POINT
    """Training entry point of model lines that name none: ``package.module:function`` or a
    script path (see docs/bring-your-own-model.md). The default trains the reference DigitNet."""

    hyperparameters: dict[str, JsonValue] = Field(default_factory=dict)
    """Hyperparameters every entry point receives, besides ``epochs``, ``batch_size``, ``lr``
    and ``seed`` (a key here wins over those)."""

    model_lines: dict[str, LineTraining] = Field(default_factory=dict)
    """Per model line: its entry point, hyperparameters and processes per node
    (``FLYWHEEL_TRAINER_DISPATCH_MODEL_LINES__<line>__ENTRY_POINT=pkg.mod:train``, or JSON)."""

    timeout_s: float = Field(default=3600.0, gt=0)
    """Longest a run may take from its start; then its processes are killed and it fails."""

    kill_grace_s: float = Field(default=5.0, ge=0)
    """Time between SIGTERM and SIGKILL when a run is cancelled or timed out."""

    poll_interval_s: float = Field(default=1.0, gt=0)
    """How often runs in progress are checked and queued ones considered."""

    lost_after_s: float = Field(default=300.0, gt=0)
    """A run whose instance has not reported on it for this long is marked failed (lost)."""

    log_tail_lines: int = Field(default=40, ge=1, le=1000)
    """Last lines of a run's log kept in its record (and in the API's run view)."""

    _entry_point_parses = field_validator("entry_point")(check_entry_point)

    @field_validator("registered_model_name")
    @classmethod
    def _known_fields_only(cls, template: str) -> str:
        try:
            name = template.format(model_line="line", project_id="project")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                "registered_model_name may only use {model_line} and {project_id}"
            ) from error
        if not name:
            raise ValueError("registered_model_name must not be empty")
        return template

    def owner(self) -> str:
        """The name this instance puts on the runs it starts."""
        return self.instance_id or socket.gethostname()

    def registered_model(self, project_id: str, model_line: str) -> str:
        """The registered model of a model line."""
        return self.registered_model_name.format(model_line=model_line, project_id=project_id)
