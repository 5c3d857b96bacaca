"""In-memory fakes of the BFF's ports, shared by unit and component tests."""

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt

from flywheel_clients.registry import ModelVersionInfo
from flywheel_contracts import InferenceLoggedV1
from flywheel_contracts.datasets import (
    ManifestEntry,
    SnapshotManifest,
    image_key,
    split_for,
)
from flywheel_inference_bff.errors import (
    ImageNotFoundError,
    ImageTooLargeError,
    InferenceTimeoutError,
    InferenceUnreachableError,
    ModelNotReadyError,
)
from flywheel_inference_bff.metrics import BffMetrics
from flywheel_inference_bff.ports import BatchJob, JobState, Progress
from flywheel_inference_bff.routing import LineRoute
from flywheel_inference_bff.service import Limits, Predictor, Routing, ServedVersions
from flywheel_runtime.errors import DependencyUnavailableError, NotFoundError

DIGITS = [str(d) for d in range(10)]
MODEL = "digits-classifier"


@dataclass
class FakeRegistry:
    """Aliases and class names per version; ``down`` plays an unreachable registry."""

    aliases: dict[tuple[str, str], str] = field(default_factory=dict)
    labels: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    model_json: dict[tuple[str, str], bytes] = field(default_factory=dict)
    down: bool = False
    alias_reads: int = 0
    label_reads: int = 0

    def add(self, name: str, version: str, labels: list[str] | None = None) -> None:
        self.labels[(name, version)] = labels or list(DIGITS)

    async def get_alias(self, name: str, alias: str) -> ModelVersionInfo | None:
        self.alias_reads += 1
        if self.down:
            raise DependencyUnavailableError("model registry is unavailable")
        version = self.aliases.get((name, alias))
        return None if version is None else ModelVersionInfo(name=name, version=version)

    async def download_serving_files(
        self, name: str, version: str
    ) -> tuple[list[str], bytes | None]:
        self.label_reads += 1
        if self.down:
            raise DependencyUnavailableError("model registry is unavailable")
        found = self.labels.get((name, version))
        if found is None:
            raise NotFoundError("model version not found")
        return found, self.model_json.get((name, version))


@dataclass
class FakeRouteStore:
    routes: dict[str, LineRoute] = field(default_factory=dict)
    projects: dict[str, str] = field(default_factory=dict)
    down: bool = False

    async def load_routes(self) -> list[LineRoute]:
        self._check()
        return list(self.routes.values())

    async def save_route(self, route: LineRoute) -> None:
        self._check()
        held = self.routes.get(route.model_line)
        if route.newer_than(held):
            self.routes[route.model_line] = route

    async def load_projects(self) -> dict[str, str]:
        self._check()
        return dict(self.projects)

    async def save_project(self, model_line: str, project_id: str) -> None:
        self._check()
        self.projects[model_line] = project_id

    def _check(self) -> None:
        if self.down:
            raise DependencyUnavailableError("database unavailable")


def version_logits(version: str, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Deterministic logits per version: version v favours class (mean pixel bucket + v) % 10."""
    rows = []
    for image in images:
        winner = (int(abs(float(image.mean())) * 7) + int(version)) % 10
        row = np.zeros(10, dtype=np.float32)
        row[winner] = 5.0
        row[(winner + 1) % 10] = 2.0
        rows.append(row)
    return np.stack(rows) if rows else np.zeros((0, 10), dtype=np.float32)


@dataclass
class FakeInference:
    """Serves the (model, version) pairs in ``loaded``; calls are recorded."""

    loaded: set[tuple[str, str]] = field(default_factory=set)
    down: bool = False
    slow: bool = False
    classes: int = 10
    calls: list[tuple[str, str, int]] = field(default_factory=list)
    shapes: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    """(version, batch shape) of every call."""

    async def infer(
        self, model: str, version: str, images: npt.NDArray[np.float32]
    ) -> npt.NDArray[np.float32]:
        self.calls.append((model, version, len(images)))
        self.shapes.append((version, tuple(images.shape)))
        if self.down:
            raise InferenceUnreachableError("inference server is unavailable")
        if self.slow:
            raise InferenceTimeoutError("inference took longer than 1s", retry_after_s=1)
        if (model, version) not in self.loaded:
            raise ModelNotReadyError(f"version {version} of {model!r} is not loaded")
        logits = version_logits(version, images)
        return logits[:, : self.classes] if self.classes < 10 else logits

    async def infer_embedded(
        self, model: str, version: str, images: npt.NDArray[np.float32], *, embedding: bool
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
        logits = await self.infer(model, version, images)
        if not embedding:
            return logits, None
        # A stand-in embedding: each image's mean and spread, so tests can tell images apart.
        flat = images.reshape(len(images), -1)
        return logits, np.stack([flat.mean(axis=1), flat.std(axis=1)], axis=1)

    async def ready(self) -> None:
        if self.down:
            raise InferenceUnreachableError("inference server is unavailable")


@dataclass
class FakeImages:
    objects: dict[str, bytes] = field(default_factory=dict)
    down: bool = False

    def add(self, data: bytes) -> str:
        key = image_key(hashlib.sha256(data).hexdigest())
        self.objects[key] = data
        return key

    async def read(self, key: str, *, max_bytes: int, field: str) -> bytes:
        if self.down:
            raise DependencyUnavailableError("object storage is unavailable")
        data = self.objects.get(key)
        if data is None:
            raise ImageNotFoundError(f"no image {key!r} in the data bucket", field=field)
        if len(data) > max_bytes:
            raise ImageTooLargeError("too large", field=field)
        return data


@dataclass
class FakeCache:
    entries: dict[str, list[float]] = field(default_factory=dict)
    reads: int = 0

    async def get(self, keys: Sequence[str]) -> list[list[float] | None]:
        self.reads += 1
        return [self.entries.get(key) for key in keys]

    async def put(self, entries: Mapping[str, list[float]]) -> None:
        self.entries.update(entries)


@dataclass
class RecordingLog:
    events: list[InferenceLoggedV1] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return True

    def offer(self, event: InferenceLoggedV1) -> None:
        self.events.append(event)


@dataclass
class World:
    registry: FakeRegistry
    routes: FakeRouteStore
    inference: FakeInference
    images: FakeImages
    cache: FakeCache
    log: RecordingLog
    routing: Routing
    predictor: Predictor
    metrics: BffMetrics
    inputs: "FakeInputs"

    def serve(self, version: str, *, champion: bool = False, name: str = MODEL) -> None:
        self.registry.add(name, version)
        self.inference.loaded.add((name, version))
        if champion:
            self.registry.aliases[(name, "champion")] = version


def world(
    *,
    registered_models: dict[str, str] | None = None,
    project_ids: dict[str, str] | None = None,
    drift: bool = False,
) -> World:
    """A predictor over fakes; ``drift`` turns on drift features and keeping inputs."""
    registry, routes = FakeRegistry(), FakeRouteStore()
    inference, images, cache, log = FakeInference(), FakeImages(), FakeCache(), RecordingLog()
    inputs = FakeInputs()
    metrics = BffMetrics.create()
    routing = Routing(
        registry,
        routes,
        registered_models=registered_models,
        project_ids=project_ids,
        champion_cache_s=30,
    )
    predictor = Predictor(
        routing,
        inference,
        ServedVersions(registry),
        images,
        cache,
        log,
        limits=Limits(max_image_bytes=50_000, max_image_pixels=250_000, chunk=4),
        metrics=metrics,
        drift_features=drift,
        inputs=inputs if drift else None,
    )
    return World(
        registry, routes, inference, images, cache, log, routing, predictor, metrics, inputs
    )


def counter(metrics: BffMetrics, name: str, **labels: str) -> float:
    """The value of one sample of the BFF's metrics (0 when never incremented)."""
    for metric in (
        metrics.predictions,
        metrics.logs_dropped,
        metrics.logs_published,
        metrics.cache,
    ):
        for family in metric.collect():
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
    return 0.0


# --- batch jobs ---------------------------------------------------------------------------------


@dataclass
class FakeJobStore:
    jobs: dict[uuid.UUID, BatchJob] = field(default_factory=dict)
    now: datetime = field(default_factory=lambda: datetime(2026, 1, 1, tzinfo=UTC))
    progress_reports: list[Progress] = field(default_factory=list)

    async def create(self, job: BatchJob) -> None:
        self.jobs[job.job_id] = job

    async def get(self, job_id: uuid.UUID) -> BatchJob | None:
        return self.jobs.get(job_id)

    async def claim(self, owner: str, lease_s: float) -> BatchJob | None:
        for job in sorted(self.jobs.values(), key=lambda j: j.created_at):
            stale = (
                job.state is JobState.RUNNING
                and job.heartbeat_at is not None
                and (self.now - job.heartbeat_at).total_seconds() > lease_s
            )
            if job.state is JobState.QUEUED or stale:
                claimed = job.model_copy(
                    update={
                        "state": JobState.RUNNING,
                        "owner": owner,
                        "attempts": job.attempts + 1,
                        "heartbeat_at": self.now,
                    }
                )
                self.jobs[job.job_id] = claimed
                return claimed
        return None

    async def progress(self, job_id: uuid.UUID, owner: str, progress: Progress) -> bool:
        job = self.jobs[job_id]
        if job.owner != owner or job.state is not JobState.RUNNING:
            return False
        self.progress_reports.append(progress)
        self.jobs[job_id] = job.model_copy(
            update=progress.model_dump() | {"error_samples": progress.error_samples}
        )
        return True

    async def finish(
        self, job_id: uuid.UUID, owner: str, state: JobState, failure: str | None = None
    ) -> bool:
        job = self.jobs[job_id]
        if job.owner != owner or job.state is not JobState.RUNNING:
            return False
        self.jobs[job_id] = job.model_copy(
            update={"state": state, "failure": failure, "finished_at": self.now}
        )
        return True

    async def release(self, job_id: uuid.UUID, owner: str) -> bool:
        job = self.jobs[job_id]
        if job.owner != owner or job.state is not JobState.RUNNING:
            return False
        self.jobs[job_id] = job.model_copy(
            update={"state": JobState.QUEUED, "owner": None, "attempts": job.attempts - 1}
        )
        return True


@dataclass
class FakeSnapshots:
    manifests: dict[tuple[str, str], SnapshotManifest] = field(default_factory=dict)

    def add(self, project_id: str, snapshot_id: str, images: list[bytes]) -> SnapshotManifest:
        entries = []
        for index, data in enumerate(images):
            sha = hashlib.sha256(data).hexdigest()
            entries.append(
                ManifestEntry(
                    label_id=uuid.UUID(int=index + 1),
                    image_sha256=sha,
                    image_key=image_key(sha),
                    class_name=str(index % 10),
                    split=split_for(sha),
                )
            )
        manifest = SnapshotManifest(snapshot_id=snapshot_id, project_id=project_id, entries=entries)
        self.manifests[(project_id, snapshot_id)] = manifest
        return manifest

    async def resolve(self, project_id: str, snapshot_id: str) -> SnapshotManifest:
        found = self.manifests.get((project_id, snapshot_id))
        if found is None:
            raise NotFoundError(f"snapshot {snapshot_id!r} not found")
        return found


@dataclass
class FakeResults:
    parts: dict[tuple[str, str, int], bytes] = field(default_factory=dict)
    writes: int = 0

    async def write_part(self, bucket: str, prefix: str, index: int, body: bytes) -> None:
        self.writes += 1
        self.parts[(bucket, prefix, index)] = body

    async def read_part(self, bucket: str, prefix: str, index: int) -> bytes:
        return self.parts[(bucket, prefix, index)]


async def collect(parts: AsyncIterator[bytes]) -> bytes:
    return b"".join([part async for part in parts])


async def settle() -> None:
    """Let background tasks scheduled by the code under test run (no wall-clock wait)."""
    for _ in range(5):
        await asyncio.sleep(0)


@dataclass
class FakeInputs:
    """Answered inputs kept for labeling, by key."""

    kept: dict[str, bytes] = field(default_factory=dict)

    async def keep(self, sha256: str, data: bytes) -> str:
        key = image_key(sha256)
        self.kept[key] = data
        return key
