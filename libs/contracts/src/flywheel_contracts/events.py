"""The events of the Flywheel loop, version 1.

project.configured, labels.saved (| data.quality_failed) → threshold.reached →
model.trained (| training.failed) → model.validated → rollout.step* → canary.verdict,
and inference.logged from serving back to the monitors.

Drift: data-monitor compares recent inferences with the champion's training data and says
drift.detected; it follows with threshold.reached (reason drift) when retraining can help, or
with labels.requested (the most drifted recent images, for the labeling queue) when it cannot
yet.

Beside the loop, the workspaces service announces engineers' GPU development environments:
workspace.requested → workspace.ready → workspace.expired (TTL or idle shutdown).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import Field

from flywheel_contracts.envelope import Event, Payload
from flywheel_contracts.topology import EVENTS_EXCHANGE, INFERENCE_EXCHANGE

Identifier = str
"""Human-readable slug ids (project, model line): lowercase letters, digits and dashes."""

SLUG = r"^[a-z0-9][a-z0-9-]{0,62}$"


# --- labels.saved -------------------------------------------------------------------------------


class PredictionFeedback(Payload):
    """A human label that answered a model pre-fill: rollout's quality signal per version."""

    prediction_id: str | None = None
    """The id the BFF returned with the prediction, when the labeling tool sent it back."""
    model_version: str | None = None
    predicted_class: str | None = None
    class_name: str
    """The class the labeler chose."""
    corrected: bool
    """The labeler changed the model's class."""


class LabelsSavedPayload(Payload):
    project_id: str = Field(pattern=SLUG)
    """Project the labels belong to."""
    batch_id: uuid.UUID
    """The accepted request (or webhook) that changed the labels."""
    snapshot_id: str
    """Content-addressed dataset snapshot holding every live label after this batch."""
    parent_snapshot_id: str | None = None
    """Snapshot this one extends; None for a project's first."""
    snapshot_sequence: int | None = Field(default=None, ge=1)
    """Position of the snapshot in its project's chain (1 for the first): the newest wins."""
    label_ids: list[uuid.UUID]
    """Labels created or updated by the batch."""
    deleted_label_ids: list[uuid.UUID] = Field(default_factory=list)
    """Labels removed by the batch (they stay in older snapshots)."""
    prefilled_count: int = Field(default=0, ge=0)
    """Labels in the batch that answered a model pre-fill (carried a prediction_id)."""
    corrected_count: int = Field(default=0, ge=0)
    """Of those, how many changed the model's class: the labelers' correction signal."""
    source: Literal["human", "pseudo", "mixed"] = "human"
    """Who produced the labels."""
    feedback: list[PredictionFeedback] = Field(default_factory=list)
    """One entry per human label of the batch that answered a pre-fill."""


class LabelsSavedV1(Event[LabelsSavedPayload]):
    TYPE: ClassVar[str] = "labels.saved"
    VERSION: ClassVar[int] = 1
    EXCHANGE: ClassVar[str] = EVENTS_EXCHANGE
    EXAMPLE: ClassVar[dict[str, Any]] = {
        "project_id": "digits",
        "batch_id": "00000000-0000-4000-8000-00000000b001",
        "snapshot_id": "snap-3f1c9a",
        "parent_snapshot_id": "snap-0a77e2",
        "snapshot_sequence": 2,
        "label_ids": ["00000000-0000-4000-8000-00000000a001"],
        "prefilled_count": 1,
        "corrected_count": 1,
    }


# --- project.configured -------------------------------------------------------------------------


class TaskType(StrEnum):
    CLASSIFICATION = "classification"
    DETECTION = "detection"


class AdaptivePolicy(Payload):
    """Retrain sooner when labelers correct the champion's pre-fills more often."""

    enabled: bool = False
    baseline_correction_rate: float = Field(default=0.05, ge=0, le=1)
    """Correction rate at which the fixed count applies unchanged."""
    sensitivity: float = Field(default=2.0, ge=0)
    """How fast the count falls as the correction rate rises above the baseline."""
    min_count: int = Field(default=50, ge=1)
    """The count never falls below this."""
    min_prefilled: int = Field(default=20, ge=1)
    """Pre-filled labels needed before the correction rate is trusted."""


class QualityPolicy(Payload):
    """When a batch of labels is quarantined instead of counted."""

    max_duplicate_rate: float = Field(default=0.5, ge=0, le=1)
    """Share of a batch's images already labeled in the project (or twice in the batch)."""
    max_class_shift: float = Field(default=0.5, ge=0, le=2)
    """Total variation distance between the batch's and the last trained class mix."""
    min_batch_for_shift: int = Field(default=50, ge=1)
    """Smaller batches are too noisy to judge their class mix."""
    labeler_min_labels: int = Field(default=20, ge=1)
    """Labels one labeler must give in a batch before their mix is judged."""
    labeler_max_class_share: float = Field(default=0.9, gt=0, le=1)
    """A labeler giving one class to more than this share of their labels is anomalous ..."""
    labeler_max_expected_share: float = Field(default=0.5, gt=0, le=1)
    """... unless that class is this common in the project anyway."""


class RetrainPolicy(Payload):
    count: int = Field(default=1000, ge=1)
    """New labels since the last retrain's snapshot that trigger the next one."""
    cooldown_s: int = Field(default=0, ge=0)
    """Minimum seconds between two retrains of a project."""
    max_wait_s: int | None = Field(default=None, ge=1)
    """Retrain on fewer labels once the oldest untrained one is this old."""
    adaptive: AdaptivePolicy = Field(default_factory=AdaptivePolicy)
    quality: QualityPolicy = Field(default_factory=QualityPolicy)


class ProjectConfiguredPayload(Payload):
    project_id: str = Field(pattern=SLUG)
    model_line: str = Field(pattern=SLUG)
    task_type: TaskType
    class_names: list[str]
    policy: RetrainPolicy
    revision: int = Field(ge=1)
    """Increases with each change, so consumers ignore an older configuration."""


class ProjectConfiguredV1(Event[ProjectConfiguredPayload]):
    TYPE: ClassVar[str] = "project.configured"
    VERSION: ClassVar[int] = 1
    EXCHANGE: ClassVar[str] = EVENTS_EXCHANGE
    EXAMPLE: ClassVar[dict[str, Any]] = {
        "project_id": "digits",
        "model_line": "digits-classifier",
        "task_type": "classification",
        "class_names": ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
        "policy": {"count": 1000, "cooldown_s": 600, "max_wait_s": 86400},
        "revision": 1,
    }


# --- data.quality_failed ------------------------------------------------------------------------


class DataQualityFailedPayload(Payload):
    project_id: str = Field(pattern=SLUG)
    batch_id: uuid.UUID
    snapshot_id: str
    report_id: uuid.UUID
    """Stored quality report with every check's figures."""
    reasons: list[str]
    quarantined_label_ids: list[uuid.UUID]


class DataQualityFailedV1(Event[DataQualityFailedPayload]):
    TYPE: ClassVar[str] = "data.quality_failed"
    VERSION: ClassVar[int] = 1
    EXCHANGE: ClassVar[str] = EVENTS_EXCHANGE
    EXAMPLE: ClassVar[dict[str, Any]] = {
        "project_id": "digits",
        "batch_id": "00000000-0000-4000-8000-00000000b001",
        "snapshot_id": "snap-3f1c9a",
        "report_id": "00000000-0000-4000-8000-00000000c001",
        "reasons": ["labeler 'mallory' gave class '7' to 98% of 60 labels (project share 10%)"],
        "quarantined_label_ids": ["00000000-0000-4000-8000-00000000a001"],
    }


# --- threshold.reached --------------------------------------------------------------------------


class ThresholdReason(StrEnum):
    COUNT = "count"
    ADAPTIVE = "adaptive"
    MAX_WAIT = "max_wait"
    MANUAL = "manual"
    DRIFT = "drift"


class ThresholdReachedPayload(Payload):
    project_id: str = Field(pattern=SLUG)
    model_line: str = Field(pattern=SLUG)
    """Registered model the retrain produces a new version of."""
    snapshot_id: str
    """Snapshot to train on."""
    reason: ThresholdReason
    decision_id: uuid.UUID
    """Stored decision (with its inputs) that fired."""
    labels_since_last: int = Field(ge=0)
    threshold: int = Field(ge=0)
    """Count the policy required when it fired."""
    excluded_label_ids: list[uuid.UUID] = Field(default_factory=list)
    """Labels of quarantined batches in the snapshot: training must leave them out."""


class ThresholdReachedV1(Event[ThresholdReachedPayload]):
    TYPE: ClassVar[str] = "threshold.reached"
    VERSION: ClassVar[int] = 1
    EXCHANGE: ClassVar[str] = EVENTS_EXCHANGE
    EXAMPLE: ClassVar[dict[str, Any]] = {
        "project_id": "digits",
        "model_line": "digits-classifier",
        "snapshot_id": "snap-3f1c9a",
        "reason": "count",
        "decision_id": "00000000-0000-4000-8000-00000000d001",
        "labels_since_last": 1000,
        "threshold": 1000,
    }


# --- model.trained / training.failed ------------------------------------------------------------


class ModelTrainedPayload(Payload):
    project_id: str = Field(pattern=SLUG)
    model_line: str = Field(pattern=SLUG)
    snapshot_id: str
    training_run_id: uuid.UUID
    """trainer-dispatch's id of the run."""
    mlflow_run_id: str
    registered_model: str
    model_version: str
    """Version in the MLflow registry."""
    base_model_version: str | None = None
    """Version fine-tuned from; None when trained from scratch."""
    backend: str
    """Where it ran: local, kubernetes-job, pytorchjob."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Training-side metrics (final loss, validation accuracy …)."""
    excluded_label_ids: list[uuid.UUID] = Field(default_factory=list)
    """Quarantined labels the run left out; the validator leaves them out of its test split."""


class ModelTrainedV1(Event[ModelTrainedPayload]):
    TYPE: ClassVar[str] = "model.trained"
    VERSION: ClassVar[int] = 1
    EXCHANGE: ClassVar[str] = EVENTS_EXCHANGE
    EXAMPLE: ClassVar[dict[str, Any]] = {
        "project_id": "digits",
        "model_line": "digits-classifier",
        "snapshot_id": "snap-3f1c9a",
        "training_run_id": "00000000-0000-4000-8000-00000000e001",
        "mlflow_run_id": "5d1c0f2e9b7a4c1d8e3f",
        "registered_model": "digits-classifier",
        "model_version": "4",
        "base_model_version": "3",
        "backend": "local",
        "metrics": {"val_accuracy": 0.982, "train_loss": 0.061},
    }


class TrainingFailedPayload(Payload):
    project_id: str = Field(pattern=SLUG)
    model_line: str = Field(pattern=SLUG)
    snapshot_id: str
    training_run_id: uuid.UUID
    mlflow_run_id: str | None = None
    backend: str
    reason: str
    """Short, operator-facing cause."""
    retryable: bool = False
    """Whether a retry of the same run may succeed (preemption, node loss)."""


class TrainingFailedV1(Event[TrainingFailedPayload]):
    TYPE: ClassVar[str] = "training.failed"
    VERSION: ClassVar[int] = 1
    EXCHANGE: ClassVar[str] = EVENTS_EXCHANGE
    EXAMPLE: ClassVar[dict[str, Any]] = {
        "project_id": "digits",
        "model_line": "digits-classifier",
        "snapshot_id": "snap-3f1c9a",
        "training_run_id": "00000000-0000-4000-8000-00000000e001",
        "backend": "local",
        "reason": "worker 1 exited with code 137 (out of memory)",
        "retryable": True,
    }


# --- model.validated ----------------------------------------------------------------------------


class ValidationVerdict(StrEnum):
    PASSED = "passed"
    FAILED = "failed"


class ModelValidatedPayload(Payload):
    project_id: str = Field(pattern=SLUG)
    model_line: str = Field(pattern=SLUG)
    registered_model: str
    model_version: str
    """The candidate."""
    champion_version: str | None = None
    """Version it was compared against; None when there was no champion yet."""
    snapshot_id: str
    """Snapshot whose held-out split was used."""
    verdict: ValidationVerdict
    candidate_metrics: dict[str, float] = Field(default_factory=dict)
    champion_metrics: dict[str, float] = Field(default_factory=dict)
    reasons: list[str] = Field(default_factory=list)
    """One line per gate: what passed or failed and by how much."""


class ModelValidatedV1(Event[ModelValidatedPayload]):
    TYPE: ClassVar[str] = "model.validated"
    VERSION: ClassVar[int] = 1
    EXCHANGE: ClassVar[str] = EVENTS_EXCHANGE
    EXAMPLE: ClassVar[dict[str, Any]] = {
        "project_id": "digits",
        "model_line": "digits-classifier",
        "registered_model": "digits-classifier",
        "model_version": "4",
        "champion_version": "3",
        "snapshot_id": "snap-3f1c9a",
        "verdict": "passed",
        "candidate_metrics": {"accuracy": 0.982},
        "champion_metrics": {"accuracy": 0.975},
        "reasons": ["accuracy 0.982 >= champion 0.975 + 0.002"],
    }


# --- rollout.step / canary.verdict --------------------------------------------------------------


class RolloutStepPayload(Payload):
    rollout_id: uuid.UUID
    project_id: str = Field(pattern=SLUG)
    model_line: str = Field(pattern=SLUG)
    registered_model: str
    candidate_version: str
    champion_version: str | None = None
    step: int = Field(ge=0)
    """Index of the step just entered."""
    traffic_percent: int = Field(ge=0, le=100)
    """Share of traffic the candidate receives from now on."""
    previous_percent: int = Field(ge=0, le=100)
    metrics: dict[str, float] = Field(default_factory=dict)
    """Analysis of the interval that justified the step."""
    sequence: int = Field(default=0, ge=0)
    """Grows with every weight change of a rollout, republications keep it: a BFF applies a
    step only if its ``(occurred_at, sequence)`` is newer than the weights it holds."""


class RolloutStepV1(Event[RolloutStepPayload]):
    TYPE: ClassVar[str] = "rollout.step"
    VERSION: ClassVar[int] = 1
    EXCHANGE: ClassVar[str] = EVENTS_EXCHANGE
    EXAMPLE: ClassVar[dict[str, Any]] = {
        "rollout_id": "00000000-0000-4000-8000-00000000f001",
        "project_id": "digits",
        "model_line": "digits-classifier",
        "registered_model": "digits-classifier",
        "candidate_version": "4",
        "champion_version": "3",
        "step": 1,
        "traffic_percent": 50,
        "previous_percent": 10,
        "metrics": {"candidate_p95_ms": 12.5, "champion_p95_ms": 12.1},
        "sequence": 2,
    }


class CanaryOutcome(StrEnum):
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"


class CanaryVerdictPayload(Payload):
    rollout_id: uuid.UUID
    project_id: str = Field(pattern=SLUG)
    model_line: str = Field(pattern=SLUG)
    registered_model: str
    candidate_version: str
    champion_version: str | None = None
    verdict: CanaryOutcome
    reasons: list[str] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)


class CanaryVerdictV1(Event[CanaryVerdictPayload]):
    TYPE: ClassVar[str] = "canary.verdict"
    VERSION: ClassVar[int] = 1
    EXCHANGE: ClassVar[str] = EVENTS_EXCHANGE
    EXAMPLE: ClassVar[dict[str, Any]] = {
        "rollout_id": "00000000-0000-4000-8000-00000000f001",
        "project_id": "digits",
        "model_line": "digits-classifier",
        "registered_model": "digits-classifier",
        "candidate_version": "4",
        "champion_version": "3",
        "verdict": "rolled_back",
        "reasons": ["candidate error rate 4.1% > champion 0.3% + 1%"],
        "metrics": {"candidate_error_rate": 0.041, "champion_error_rate": 0.003},
    }


# --- inference.logged ---------------------------------------------------------------------------


class ImageStatistics(Payload):
    """Cheap statistics of one input image, compared with the training data's for drift."""

    brightness: float = Field(ge=0, le=1)
    """Mean grey level, 0 black to 1 white."""
    contrast: float = Field(ge=0, le=1)
    """Standard deviation of the grey levels."""
    width: int = Field(ge=1)
    height: int = Field(ge=1)


class InferenceLoggedPayload(Payload):
    request_id: uuid.UUID
    project_id: str = Field(pattern=SLUG)
    model_line: str = Field(pattern=SLUG)
    registered_model: str
    model_version: str
    input_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """Hash of the image bytes; the image itself is referenced, never copied into the log."""
    predicted_class: str | None = None
    confidence: float | None = Field(default=None, ge=0, le=1)
    latency_ms: float = Field(ge=0)
    status: Literal["ok", "error"]
    error_code: str | None = None
    route: Literal["online", "batch"] = "online"
    served_at: datetime
    serving_unavailable: bool = False
    """True when the request failed because the inference server could not be reached at all
    (connection refused or dropped): no model saw it, so the failure says nothing about the
    version. A failure the server answered (a model error, a version not loaded, a timeout)
    leaves it False."""
    embedding: list[float] | None = None
    """The served model's penultimate-layer embedding of the input, when the model declares
    an embedding output (drift detection compares these with the training data's)."""
    image_stats: ImageStatistics | None = None
    input_key: str | None = None
    """S3 key (data bucket, ``flywheel_contracts.datasets.image_key``) of the stored input
    image, when the BFF keeps inputs: what a labeling request for this inference points at."""


class InferenceLoggedV1(Event[InferenceLoggedPayload]):
    TYPE: ClassVar[str] = "inference.logged"
    VERSION: ClassVar[int] = 1
    EXCHANGE: ClassVar[str] = INFERENCE_EXCHANGE
    EXAMPLE: ClassVar[dict[str, Any]] = {
        "request_id": "00000000-0000-4000-8000-000000001001",
        "project_id": "digits",
        "model_line": "digits-classifier",
        "registered_model": "digits-classifier",
        "model_version": "4",
        "input_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "predicted_class": "7",
        "confidence": 0.97,
        "latency_ms": 8.4,
        "status": "ok",
        "served_at": "2026-01-01T12:00:00Z",
    }


# --- drift.detected -----------------------------------------------------------------------------


class DriftAction(StrEnum):
    RETRAIN = "retrain"
    """A threshold.reached with reason drift follows: enough fresh labels to retrain on."""
    LABELS_REQUESTED = "labels_requested"
    """A labels.requested follows: the drifted slice needs labels before a retrain can help."""
    ALERT = "alert"
    """Nothing follows (no stored inputs to request labels for, or a request is pending)."""


class DriftTestSummary(Payload):
    """One drift test of the report, as the event carries it (the report has every figure)."""

    kind: Literal["embedding", "statistic", "classes"]
    feature: str
    drifted: bool
    p_value: float | None = None
    effect: float | None = None
    """AUC, PSI or total variation distance, by kind."""
    threshold: float


class DriftDetectedPayload(Payload):
    project_id: str = Field(pattern=SLUG)
    model_line: str = Field(pattern=SLUG)
    model_version: str
    """The champion whose training data was the reference."""
    report_id: uuid.UUID
    """Stored drift report (every test's numbers and p-values, plots)."""
    window_start: datetime
    window_end: datetime
    samples: int = Field(ge=0)
    """Inferences in the window."""
    tests: list[DriftTestSummary]
    action: DriftAction
    reasons: list[str]


class DriftDetectedV1(Event[DriftDetectedPayload]):
    TYPE: ClassVar[str] = "drift.detected"
    VERSION: ClassVar[int] = 1
    EXCHANGE: ClassVar[str] = EVENTS_EXCHANGE
    EXAMPLE: ClassVar[dict[str, Any]] = {
        "project_id": "digits",
        "model_line": "digits-classifier",
        "model_version": "3",
        "report_id": "00000000-0000-4000-8000-00000000d001",
        "window_start": "2026-01-01T11:00:00Z",
        "window_end": "2026-01-01T12:00:00Z",
        "samples": 1200,
        "tests": [
            {
                "kind": "embedding",
                "feature": "embedding",
                "drifted": True,
                "p_value": 1e-12,
                "effect": 0.94,
                "threshold": 0.7,
            }
        ],
        "action": "labels_requested",
        "reasons": ["embedding: domain classifier AUC 0.94 >= 0.70 (p=1e-12)"],
    }


# --- labels.requested ---------------------------------------------------------------------------


class LabelRequestItem(Payload):
    """One image the labelers are asked to label."""

    input_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    image_key: str
    """S3 key of the image in the data bucket: ``flywheel_contracts.datasets.image_key`` of its
    sha256, where labeling keeps the images of labels too (the BFF stores inputs there)."""
    score: float
    """How strongly it stands for the drift (higher first)."""
    predicted_class: str | None = None
    """The serving model's answer: a pre-label to correct."""
    confidence: float | None = Field(default=None, ge=0, le=1)


class LabelsRequestedPayload(Payload):
    project_id: str = Field(pattern=SLUG)
    model_line: str = Field(pattern=SLUG)
    request_id: uuid.UUID
    """Identity of the request (labeling keeps each image once per request)."""
    reason: Literal["drift"]
    report_id: uuid.UUID | None = None
    """The drift report that asked, when the reason is drift."""
    items: list[LabelRequestItem] = Field(min_length=1, max_length=1000)


class LabelsRequestedV1(Event[LabelsRequestedPayload]):
    TYPE: ClassVar[str] = "labels.requested"
    VERSION: ClassVar[int] = 1
    EXCHANGE: ClassVar[str] = EVENTS_EXCHANGE
    EXAMPLE: ClassVar[dict[str, Any]] = {
        "project_id": "digits",
        "model_line": "digits-classifier",
        "request_id": "00000000-0000-4000-8000-00000000e001",
        "reason": "drift",
        "report_id": "00000000-0000-4000-8000-00000000d001",
        "items": [
            {
                "input_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                "image_key": (
                    "images/9f/9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
                ),
                "score": 0.98,
                "predicted_class": "8",
                "confidence": 0.41,
            }
        ],
    }


# --- workspace.requested / workspace.ready / workspace.expired ----------------------------------


class WorkspacePayload(Payload):
    """What every workspace event says about the environment: whose, and which GPUs."""

    workspace_id: uuid.UUID
    """The environment (``/api/v1/environments/{workspace_id}`` of the workspaces service)."""
    owner: str = Field(min_length=1, max_length=255)
    """Token subject of the engineer it belongs to."""
    gpu_type: str = Field(pattern=SLUG)
    """GPU kind asked for (``a100``, ``h100`` …)."""
    gpu_count: int = Field(ge=0)
    """GPUs, MIG slices or shares held (0: a CPU-only environment)."""
    mode: str
    """How the GPUs are shared: ``full``, ``mig``, ``time-sliced`` or ``mps``."""
    mig_profile: str | None = None
    """MIG profile (``1g.10gb``) with mode ``mig``."""


class WorkspaceRequestedPayload(WorkspacePayload):
    image: str
    """Container image of the environment."""
    ttl_s: int = Field(ge=0)
    """Lifetime from readiness, after the service's cap."""
    state: Literal["queued", "provisioning"]
    """``queued`` when no GPU of that kind was free, ``provisioning`` when admitted at once."""
    queue_position: int | None = Field(default=None, ge=1)
    """1-based place among the queued requests for the same GPUs, when queued."""
    resumed: bool = False
    """A stopped environment started again on its kept home volume."""


class WorkspaceRequestedV1(Event[WorkspaceRequestedPayload]):
    TYPE: ClassVar[str] = "workspace.requested"
    VERSION: ClassVar[int] = 1
    EXCHANGE: ClassVar[str] = EVENTS_EXCHANGE
    EXAMPLE: ClassVar[dict[str, Any]] = {
        "workspace_id": "00000000-0000-4000-8000-000000002001",
        "owner": "ada",
        "gpu_type": "a100",
        "gpu_count": 1,
        "mode": "full",
        "image": "ghcr.io/flywheel-mlops/flywheel-dev:latest",
        "ttl_s": 28800,
        "state": "queued",
        "queue_position": 2,
    }


class WorkspaceReadyPayload(WorkspacePayload):
    ready_at: datetime
    expires_at: datetime
    """When its TTL ends (an extension moves it; the next event says so)."""
    waited_s: float = Field(ge=0)
    """Seconds from the request to readiness: queueing and provisioning."""
    backend: str
    """Where it runs: ``local`` or ``kubernetes``."""


class WorkspaceReadyV1(Event[WorkspaceReadyPayload]):
    TYPE: ClassVar[str] = "workspace.ready"
    VERSION: ClassVar[int] = 1
    EXCHANGE: ClassVar[str] = EVENTS_EXCHANGE
    EXAMPLE: ClassVar[dict[str, Any]] = {
        "workspace_id": "00000000-0000-4000-8000-000000002001",
        "owner": "ada",
        "gpu_type": "a100",
        "gpu_count": 1,
        "mode": "full",
        "ready_at": "2026-01-01T12:05:00Z",
        "expires_at": "2026-01-01T20:05:00Z",
        "waited_s": 300.0,
        "backend": "kubernetes",
    }


class WorkspaceExpiryReason(StrEnum):
    TTL = "ttl"
    """Its lifetime (with extensions) ran out."""
    IDLE = "idle"
    """Nobody used it for the idle timeout."""


class WorkspaceExpiredPayload(WorkspacePayload):
    reason: WorkspaceExpiryReason
    started_at: datetime
    """When it began to hold its GPUs (admitted, handed to the backend)."""
    ended_at: datetime
    """When its compute was stopped and the GPUs freed."""
    held_s: float = Field(ge=0)
    """Seconds it held its GPUs: ``ended_at - started_at``."""
    home_kept: bool = True
    """The home volume survives; starting the environment again mounts it."""


class WorkspaceExpiredV1(Event[WorkspaceExpiredPayload]):
    TYPE: ClassVar[str] = "workspace.expired"
    VERSION: ClassVar[int] = 1
    EXCHANGE: ClassVar[str] = EVENTS_EXCHANGE
    EXAMPLE: ClassVar[dict[str, Any]] = {
        "workspace_id": "00000000-0000-4000-8000-000000002001",
        "owner": "ada",
        "gpu_type": "a100",
        "gpu_count": 1,
        "mode": "full",
        "reason": "idle",
        "started_at": "2026-01-01T12:00:00Z",
        "ended_at": "2026-01-01T14:00:00Z",
        "held_s": 7200.0,
    }


ALL_EVENTS: tuple[type[Event[Any]], ...] = (
    ProjectConfiguredV1,
    LabelsSavedV1,
    DataQualityFailedV1,
    ThresholdReachedV1,
    ModelTrainedV1,
    TrainingFailedV1,
    ModelValidatedV1,
    RolloutStepV1,
    CanaryVerdictV1,
    InferenceLoggedV1,
    DriftDetectedV1,
    LabelsRequestedV1,
    WorkspaceRequestedV1,
    WorkspaceReadyV1,
    WorkspaceExpiredV1,
)
"""Every event class, in loop order; the schema registry and tests iterate over it."""
