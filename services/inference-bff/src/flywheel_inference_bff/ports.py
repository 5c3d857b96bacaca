"""What the use cases need from the outside world, and the records that cross those ports.

``Inference`` is Triton (or any KServe v2 server) behind ``tritonclient``. ``Registry`` is the
MLflow registry (``flywheel_clients.registry.ModelRegistry`` implements it as is): the champion
alias and each version's class names. ``PredictionCache`` is Redis (or nothing).
``InferenceLog`` takes inference logs without ever blocking. ``Images`` and ``Results`` are the
data bucket; ``Snapshots`` resolves a dataset snapshot. ``RouteStore`` keeps the newest routing
weights so a replica that starts mid-canary routes like the others; ``JobStore`` is the batch
jobs in the service's PostgreSQL schema.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Protocol

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from flywheel_clients.registry import ModelVersionInfo
from flywheel_contracts import InferenceLoggedV1
from flywheel_contracts.datasets import SnapshotManifest, Split
from flywheel_inference_bff.routing import LineRoute


class Inference(Protocol):
    """A v2 inference server serving every registered version under the registered name."""

    async def infer(
        self, model: str, version: str, images: npt.NDArray[np.float32]
    ) -> npt.NDArray[np.float32]:
        """Logits ``[N, C]`` for preprocessed images ``[N, channels, height, width]``.

        ``ModelNotReadyError`` when the version is not loaded, ``InferenceTimeoutError`` past
        the timeout, ``InferenceUnavailableError`` when the server does not answer.
        """
        ...

    async def infer_embedded(
        self, model: str, version: str, images: npt.NDArray[np.float32], *, embedding: bool
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
        """Logits and, when ``embedding``, the model's embedding output ``[N, D]`` (for
        drift checks; only versions that declare one are asked)."""
        ...

    async def ready(self) -> None:
        """Readiness: raises unless the server says it is ready."""
        ...


class Registry(Protocol):
    """The model registry: the champion alias, each version's class names and declaration."""

    async def get_alias(self, name: str, alias: str) -> ModelVersionInfo | None:
        """None when the alias (or the registered model) does not exist."""
        ...

    async def download_serving_files(
        self, name: str, version: str
    ) -> tuple[list[str], bytes | None]:
        """Class names in output order and the ``model.json`` (None when the version has
        none); ``NotFoundError`` for a missing version or class names."""
        ...


class PredictionCache(Protocol):
    """Class probabilities by image, model and version; a failure is a miss, never an error."""

    async def get(self, keys: Sequence[str]) -> list[list[float] | None]: ...

    async def put(self, entries: Mapping[str, list[float]]) -> None: ...


class InferenceLog(Protocol):
    """Where inference logs go; ``offer`` returns at once whatever the broker does."""

    @property
    def enabled(self) -> bool: ...

    def offer(self, event: InferenceLoggedV1) -> None: ...


class Inputs(Protocol):
    """Where answered inputs are kept for later labeling (drift's needs-label queue)."""

    async def keep(self, sha256: str, data: bytes) -> str:
        """Store the image content-addressed; its key in the data bucket."""
        ...


class Images(Protocol):
    """Images in the data bucket."""

    async def read(self, key: str, *, max_bytes: int, field: str) -> bytes:
        """``ImageNotFoundError`` for a missing key, ``ImageTooLargeError`` over ``max_bytes``;
        ``DependencyUnavailableError`` while S3 is away."""
        ...


class Snapshots(Protocol):
    async def resolve(self, project_id: str, snapshot_id: str) -> SnapshotManifest:
        """``NotFoundError`` for an unknown snapshot."""
        ...


class Results(Protocol):
    """Batch job results: JSONL parts under one prefix."""

    async def write_part(self, bucket: str, prefix: str, index: int, body: bytes) -> None: ...

    async def read_part(self, bucket: str, prefix: str, index: int) -> bytes: ...


class RouteStore(Protocol):
    """The newest routing weights and the project of each model line, shared by replicas."""

    async def load_routes(self) -> list[LineRoute]: ...

    async def save_route(self, route: LineRoute) -> None:
        """Store ``route`` unless a newer one is stored already."""
        ...

    async def load_projects(self) -> dict[str, str]:
        """Project id by model line."""
        ...

    async def save_project(self, model_line: str, project_id: str) -> None: ...


# --- batch jobs -----------------------------------------------------------------------------


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class JobError(BaseModel):
    """One image a batch job could not label."""

    model_config = ConfigDict(frozen=True)

    image_key: str
    code: str
    message: str


class BatchJob(BaseModel):
    """A batch job over a snapshot: what it labels, with which version, and how far it got."""

    model_config = ConfigDict(frozen=True)

    job_id: uuid.UUID
    state: JobState
    project_id: str
    snapshot_id: str
    splits: list[Split]
    model_line: str
    registered_model: str
    model_version: str
    """Pinned when the job is created: every pseudo label of a job comes from one version."""
    chunk_size: int
    total: int | None = None
    """Images to label; known once the runner resolved the snapshot."""
    done: int = 0
    errors: int = 0
    next_chunk: int = 0
    """Chunks (and results parts) written so far; a resumed job starts here."""
    error_samples: list[JobError] = Field(default_factory=list)
    failure: str | None = None
    results_bucket: str
    results_prefix: str
    requested_by: str
    owner: str | None = None
    """Replica running the job; another takes over once its heartbeat is older than the lease."""
    attempts: int = 0
    """Times a replica took the job up; past the limit it is failed, not retried forever."""
    heartbeat_at: datetime | None = None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None

    @property
    def parts(self) -> int:
        """Results parts written."""
        return self.next_chunk


class Progress(BaseModel):
    """What a runner reports after a wave of chunks."""

    model_config = ConfigDict(frozen=True)

    total: int
    done: int
    errors: int
    next_chunk: int
    error_samples: list[JobError]


class JobStore(Protocol):
    async def create(self, job: BatchJob) -> None: ...

    async def get(self, job_id: uuid.UUID) -> BatchJob | None: ...

    async def claim(self, owner: str, lease_s: float) -> BatchJob | None:
        """Take one queued job, or a running one whose owner stopped reporting; None if none."""
        ...

    async def progress(self, job_id: uuid.UUID, owner: str, progress: Progress) -> bool:
        """Record progress and renew the lease; False when another replica took the job."""
        ...

    async def finish(
        self, job_id: uuid.UUID, owner: str, state: JobState, failure: str | None = None
    ) -> bool:
        """Mark the job succeeded or failed; False when another replica took the job."""
        ...

    async def release(self, job_id: uuid.UUID, owner: str) -> bool:
        """Queue a running job again (this replica stops): the next sweep of any replica
        resumes it, and this claim does not count as an attempt."""
        ...
