"""Batch jobs: pseudo labels for a dataset snapshot, one more front on the ``Predictor``.

A job is stored (queued) before the request is answered 202, with its version pinned, so every
pseudo label of a job comes from one model version. Any replica's runner claims queued jobs,
and jobs whose replica stopped reporting for ``lease_s`` (it crashed or was stopped): a job is
resumed where its last progress report left it, never forgotten. Each chunk of images becomes
one JSONL part in S3, written whole under a name fixed by the chunk's position, so a chunk redone
after a restart overwrites its part with the same lines. A job that keeps failing is marked
failed with the reason after ``max_attempts`` claims or ``retries`` outages in a row.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import structlog

from flywheel_contracts.datasets import ManifestEntry, Split
from flywheel_inference_bff.errors import JobNotFinishedError, JobNotFoundError
from flywheel_inference_bff.inputs import StoredImage
from flywheel_inference_bff.ports import (
    BatchJob,
    JobError,
    JobState,
    JobStore,
    Progress,
    Results,
    Snapshots,
)
from flywheel_inference_bff.service import (
    ItemFailure,
    Prediction,
    PredictOptions,
    Predictor,
    Target,
)
from flywheel_runtime.errors import DependencyUnavailableError, FlywheelError, NotFoundError

log = structlog.get_logger(__name__)

MAX_ERROR_SAMPLES = 20
"""Failed images a job keeps the reason of; the count covers every one."""

T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class JobRequest:
    snapshot_id: str
    project_id: str | None = None
    """Project of the snapshot; the model line's project when None."""
    model_line: str | None = None
    model_version: str | None = None
    """Pin this version rather than the one serving the line's champion traffic."""
    splits: Sequence[Split] = (Split.TRAIN, Split.VALIDATION, Split.TEST)


@dataclass(frozen=True)
class JobSettings:
    data_bucket: str
    """Where the snapshots and their images are."""
    results_bucket: str
    results_prefix: str = "pseudo-labels/"
    chunk_size: int = 64
    concurrency: int = 4
    """Chunks of one job in flight at once."""
    slots: int = 1
    """Jobs one replica runs at once."""
    lease_s: float = 60.0
    sweep_s: float = 10.0
    retries: int = 5
    """Outages in a row (Triton, S3, registry) a chunk waits through before the job fails."""
    retry_s: float = 1.0
    """First wait after an outage; doubled each time, at most ``lease_s / 4``."""
    max_attempts: int = 3


class JobFailedError(FlywheelError):
    """A job that cannot go on; its message is the failure reported to the client."""

    code = "job_failed"


class BatchJobs:
    """Creates, reports on and runs batch jobs."""

    def __init__(
        self,
        store: JobStore,
        predictor: Predictor,
        snapshots: Snapshots,
        results: Results,
        settings: JobSettings,
        *,
        default_model_line: str,
        replica: str,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._predictor = predictor
        self._snapshots = snapshots
        self._results = results
        self._settings = settings
        self._default_model_line = default_model_line
        self._replica = replica
        self._clock = clock
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._running: dict[uuid.UUID, asyncio.Task[None]] = {}

    # --- use cases ----------------------------------------------------------------------------

    async def create(self, request: JobRequest, requested_by: str) -> BatchJob:
        """Store a queued job with its version pinned; a runner picks it up at once."""
        routing = self._predictor.routing
        line = request.model_line or self._default_model_line
        if request.model_version is not None:
            target = Target(line, routing.registered_model(line), request.model_version)
        else:
            target = await routing.champion(line)
        job_id = uuid.uuid4()
        now = self._clock()
        job = BatchJob(
            job_id=job_id,
            state=JobState.QUEUED,
            project_id=request.project_id or routing.project_for(line),
            snapshot_id=request.snapshot_id,
            splits=list(dict.fromkeys(request.splits)),
            model_line=line,
            registered_model=target.registered_model,
            model_version=target.version,
            chunk_size=self._settings.chunk_size,
            results_bucket=self._settings.results_bucket,
            results_prefix=f"{self._settings.results_prefix}{job_id}/",
            requested_by=requested_by,
            created_at=now,
            updated_at=now,
        )
        await self._store.create(job)
        log.info("batch job queued", job_id=str(job_id), snapshot_id=request.snapshot_id)
        self._wake.set()
        return job

    async def get(self, job_id: uuid.UUID) -> BatchJob:
        job = await self._store.get(job_id)
        if job is None:
            raise JobNotFoundError(str(job_id))
        return job

    async def results(self, job_id: uuid.UUID) -> AsyncIterator[bytes]:
        """The pseudo labels of a succeeded job, part by part, in snapshot order."""
        job = await self.get(job_id)
        if job.state is not JobState.SUCCEEDED:
            raise JobNotFinishedError(
                f"batch job {job_id} is {job.state.value}; results come once it succeeded",
                details={"job_id": str(job_id), "state": job.state.value},
            )
        return self._parts(job)

    async def _parts(self, job: BatchJob) -> AsyncIterator[bytes]:
        for index in range(job.parts):
            yield await self._results.read_part(job.results_bucket, job.results_prefix, index)

    # --- the runner ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._loop(), name="batch-job-runner")

    async def stop(self) -> None:
        """Stop claiming, cancel running jobs and queue them again for any replica; their
        progress stays, so they resume where their last report left them."""
        running = list(self._running)
        tasks = [t for t in (self._loop_task, *self._running.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._loop_task = None
        self._running.clear()
        for job_id in running:
            try:
                await self._store.release(job_id, self._replica)
            except DependencyUnavailableError:
                # Not lost: the lease runs out and another replica takes the job over.
                log.warning("batch job not released: database unavailable", job_id=str(job_id))

    async def sweep(self) -> int:
        """Claim what this replica has room for; the number of jobs started."""
        started = 0
        while len(self._running) < self._settings.slots:
            job = await self._store.claim(self._replica, self._settings.lease_s)
            if job is None:
                break
            task = asyncio.create_task(self.run(job), name=f"batch-job-{job.job_id}")
            self._running[job.job_id] = task
            task.add_done_callback(functools.partial(self._finished, job.job_id))
            started += 1
        return started

    def _finished(self, job_id: uuid.UUID, _: asyncio.Task[None]) -> None:
        self._running.pop(job_id, None)
        # A slot is free: look for more work now rather than at the next sweep.
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except DependencyUnavailableError:
                log.warning("batch jobs not swept: database unavailable")
            except Exception:  # the runner outlives one bad sweep; the error is logged whole
                log.exception("batch job sweep failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.sweep_s):
                    await self._wake.wait()

    async def run(self, job: BatchJob) -> None:
        """Label the job's images from where it left off; report success or the failure."""
        bound = log.bind(job_id=str(job.job_id), attempt=job.attempts)
        try:
            if job.attempts > self._settings.max_attempts:
                raise JobFailedError(
                    f"gave up after {job.attempts - 1} attempts: the replicas running it "
                    "stopped before it finished"
                )
            entries = await self._entries(job)
            await self._label(job, entries)
            if await self._store.finish(job.job_id, self._replica, JobState.SUCCEEDED):
                bound.info("batch job succeeded", total=len(entries))
        except _LostLease:
            bound.warning("batch job taken over by another replica; stopped here")
        except DependencyUnavailableError:
            # Only the job store raises this unwrapped (outages of the rest are retried):
            # the lease runs out and a sweep resumes the job from its last report.
            bound.warning("batch job paused: database unavailable; resumed after its lease")
        except FlywheelError as error:
            await self._fail(job, error.message)

    async def _entries(self, job: BatchJob) -> list[ManifestEntry]:
        try:
            manifest = await self._retrying(
                functools.partial(self._snapshots.resolve, job.project_id, job.snapshot_id)
            )
        except NotFoundError as error:
            raise JobFailedError(
                f"snapshot {job.snapshot_id!r} not found in project {job.project_id!r}"
            ) from error
        wanted = set(job.splits)
        seen: set[str] = set()
        entries = []
        for entry in manifest.entries:
            if entry.split in wanted and entry.image_sha256 not in seen:
                seen.add(entry.image_sha256)
                entries.append(entry)
        return entries

    async def _label(self, job: BatchJob, entries: list[ManifestEntry]) -> None:
        total = len(entries)
        chunks = math.ceil(total / job.chunk_size)
        done, errors = job.done, job.errors
        samples = list(job.error_samples)
        chunk = job.next_chunk
        if job.total is None:
            # First start: make the total visible before the first chunk is done.
            done, errors, samples, chunk = 0, 0, [], 0
            await self._report(
                job, Progress(total=total, done=0, errors=0, next_chunk=0, error_samples=[])
            )
        while chunk < chunks:
            wave = range(chunk, min(chunk + self._settings.concurrency, chunks))
            written = await asyncio.gather(*(self._chunk(job, entries, i) for i in wave))
            for labeled, failures in written:
                done += labeled + len(failures)
                errors += len(failures)
                samples += failures[: MAX_ERROR_SAMPLES - len(samples)]
            chunk = wave.stop
            progress = Progress(
                total=total, done=done, errors=errors, next_chunk=chunk, error_samples=samples
            )
            await self._report(job, progress)

    async def _chunk(
        self, job: BatchJob, entries: list[ManifestEntry], index: int
    ) -> tuple[int, list[JobError]]:
        batch = entries[index * job.chunk_size : (index + 1) * job.chunk_size]
        options = PredictOptions(
            model_line=job.model_line,
            top_k=1,
            route="batch",
            target=Target(job.model_line, job.registered_model, job.model_version),
        )
        refs = [StoredImage(entry.image_key, f"image_key:{entry.image_key}") for entry in batch]
        outcomes = await self._retrying(lambda: self._predictor.predict_many(refs, options))
        lines: list[str] = []
        failures: list[JobError] = []
        for entry, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, ItemFailure):
                failures.append(
                    JobError(
                        image_key=entry.image_key,
                        code=outcome.error.code,
                        message=outcome.error.message,
                    )
                )
            else:
                line = pseudo_label(entry, outcome, self._settings.data_bucket)
                lines.append(json.dumps(line, sort_keys=True))
        body = "".join(line + "\n" for line in lines).encode()
        await self._retrying(
            lambda: self._results.write_part(job.results_bucket, job.results_prefix, index, body)
        )
        return len(lines), failures

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call``, again after each outage (with doubling waits), until ``retries`` ran out."""
        wait = self._settings.retry_s
        for attempt in range(self._settings.retries):
            try:
                return await call()
            except DependencyUnavailableError as error:
                log.warning("batch job waits out an outage", error=error.code, attempt=attempt + 1)
                await asyncio.sleep(wait)
                wait = min(wait * 2, self._settings.lease_s / 4)
        try:
            return await call()
        except DependencyUnavailableError as error:
            raise JobFailedError(
                f"gave up after {self._settings.retries + 1} attempts: {error.message}"
            ) from error

    async def _report(self, job: BatchJob, progress: Progress) -> None:
        if not await self._store.progress(job.job_id, self._replica, progress):
            raise _LostLease

    async def _fail(self, job: BatchJob, failure: str) -> None:
        if await self._store.finish(job.job_id, self._replica, JobState.FAILED, failure):
            log.warning("batch job failed", job_id=str(job.job_id), failure=failure)


class _LostLease(Exception):
    """Another replica took the job over: this one stops without reporting."""


def pseudo_label(
    entry: ManifestEntry, prediction: Prediction, data_bucket: str
) -> dict[str, object]:
    """One results line: where the image is, what the model said, and ``label``, a labels:batch
    item labeling accepts as it is (``source`` pseudo)."""
    confidence = round(prediction.confidence, 6)
    return {
        "image_key": entry.image_key,
        "image_sha256": prediction.input_sha256,
        "split": entry.split.value,
        "predicted_class": prediction.predicted_class,
        "confidence": confidence,
        "model_line": prediction.model_line,
        "registered_model": prediction.registered_model,
        "model_version": prediction.model_version,
        "prediction_id": str(prediction.prediction_id),
        "source": "pseudo",
        "label": {
            "image_uri": f"s3://{data_bucket}/{entry.image_key}",
            "class_name": prediction.predicted_class,
            "source": "pseudo",
            "prediction_id": str(prediction.prediction_id),
            "model_version": prediction.model_version,
            "predicted_class": prediction.predicted_class,
            "confidence": confidence,
        },
    }
