import json
import uuid
from dataclasses import dataclass

import pytest

from flywheel_contracts.datasets import Split
from flywheel_inference_bff.errors import JobNotFinishedError, JobNotFoundError
from flywheel_inference_bff.jobs import BatchJobs, JobRequest, JobSettings
from flywheel_inference_bff.ports import BatchJob, JobState

from ..conftest import digit_image
from ..fakes import (
    MODEL,
    FakeJobStore,
    FakeResults,
    FakeSnapshots,
    World,
    collect,
    world,
)

PROJECT = "digits"
SNAPSHOT = "snap-1"
DATA = "flywheel-data"
LABEL_FIELDS = {
    "image_uri",
    "class_name",
    "source",
    "prediction_id",
    "model_version",
    "predicted_class",
    "confidence",
}
"""What labeling's labels:batch item takes (image_uri plus its LabelFields)."""


@dataclass
class Jobs:
    w: World
    store: FakeJobStore
    snapshots: FakeSnapshots
    results: FakeResults
    jobs: BatchJobs
    images: list[bytes]

    async def claim_and_run(self, replica: str = "replica-a") -> BatchJob:
        claimed = await self.store.claim(replica, 60)
        assert claimed is not None
        await self.jobs.run(claimed)
        return self.store.jobs[claimed.job_id]


def setup(count: int = 10, *, retries: int = 1, replica: str = "replica-a") -> Jobs:
    w = world(project_ids={MODEL: PROJECT})
    w.serve("1", champion=True)
    images = [digit_image(i) for i in range(count)]
    for data in images:
        w.images.add(data)
    snapshots, results, store = FakeSnapshots(), FakeResults(), FakeJobStore()
    snapshots.add(PROJECT, SNAPSHOT, images)
    jobs = BatchJobs(
        store,
        w.predictor,
        snapshots,
        results,
        JobSettings(
            data_bucket=DATA,
            results_bucket="results",
            chunk_size=3,
            concurrency=2,
            retries=retries,
            retry_s=0,
        ),
        default_model_line=MODEL,
        replica=replica,
    )
    return Jobs(w, store, snapshots, results, jobs, images)


async def test_a_job_labels_every_image_of_its_snapshot_with_its_pinned_version() -> None:
    t = setup(10)
    created = await t.jobs.create(JobRequest(snapshot_id=SNAPSHOT), requested_by="alice")
    t.w.serve("2", champion=True)  # a new champion after creation: the job keeps its version

    job = await t.claim_and_run()
    lines = [
        json.loads(line) for line in (await collect(await t.jobs.results(job.job_id))).splitlines()
    ]

    assert (created.state, created.model_version, created.project_id) == (
        JobState.QUEUED,
        "1",
        PROJECT,
    )
    assert job.state is JobState.SUCCEEDED
    assert (job.total, job.done, job.errors, job.parts) == (10, 10, 0, 4)
    assert [r.next_chunk for r in t.store.progress_reports] == [0, 2, 4]
    entries = t.snapshots.manifests[(PROJECT, SNAPSHOT)].entries
    assert [line["image_key"] for line in lines] == [e.image_key for e in entries]
    for line, entry in zip(lines, entries, strict=True):
        assert line["image_sha256"] == entry.image_sha256
        assert line["model_version"] == "1"
        assert line["source"] == "pseudo"
        assert set(line["label"]) == LABEL_FIELDS
        assert line["label"]["image_uri"] == f"s3://{DATA}/{entry.image_key}"
        assert line["label"]["class_name"] == line["predicted_class"]
        assert 0 < line["label"]["confidence"] <= 1
    assert {e.payload.route for e in t.w.log.events} == {"batch"}
    assert {e.payload.model_version for e in t.w.log.events} == {"1"}


async def test_only_the_chosen_splits_are_labeled() -> None:
    t = setup(30)

    await t.jobs.create(
        JobRequest(snapshot_id=SNAPSHOT, splits=[Split.TEST, Split.VALIDATION]), "alice"
    )
    job = await t.claim_and_run()

    entries = t.snapshots.manifests[(PROJECT, SNAPSHOT)].entries
    assert job.total == sum(e.split is not Split.TRAIN for e in entries)


async def test_a_resumed_job_starts_at_its_last_reported_chunk() -> None:
    t = setup(10)
    created = await t.jobs.create(JobRequest(snapshot_id=SNAPSHOT), "alice")
    # Another replica finished two chunks (6 images) and died.
    t.store.jobs[created.job_id] = created.model_copy(
        update={"total": 10, "done": 6, "next_chunk": 2, "state": JobState.QUEUED}
    )

    job = await t.claim_and_run()

    assert job.state is JobState.SUCCEEDED
    assert (job.done, job.parts) == (10, 4)
    assert t.results.writes == 2
    assert len(t.w.log.events) == 4


async def test_images_that_cannot_be_labeled_are_counted_and_sampled() -> None:
    t = setup(6)
    broken = t.snapshots.manifests[(PROJECT, SNAPSHOT)].entries[1].image_key
    t.w.images.objects[broken] = b"not an image"

    await t.jobs.create(JobRequest(snapshot_id=SNAPSHOT), "alice")
    job = await t.claim_and_run()

    assert job.state is JobState.SUCCEEDED
    assert (job.done, job.errors) == (6, 1)
    [sample] = job.error_samples
    assert (sample.image_key, sample.code) == (broken, "invalid_image")
    lines = (await collect(await t.jobs.results(job.job_id))).splitlines()
    assert len(lines) == 5


async def test_a_job_fails_with_the_reason_once_an_outage_outlasts_its_retries() -> None:
    t = setup(4, retries=2)
    t.w.inference.down = True

    await t.jobs.create(JobRequest(snapshot_id=SNAPSHOT), "alice")
    job = await t.claim_and_run()

    assert job.state is JobState.FAILED
    assert job.failure == "gave up after 3 attempts: inference server is unavailable"
    with pytest.raises(JobNotFinishedError):
        await t.jobs.results(job.job_id)


async def test_a_missing_snapshot_fails_the_job() -> None:
    t = setup(1)

    await t.jobs.create(JobRequest(snapshot_id="snap-nope"), "alice")
    job = await t.claim_and_run()

    assert job.state is JobState.FAILED
    assert job.failure == "snapshot 'snap-nope' not found in project 'digits'"


async def test_a_job_taken_over_by_another_replica_stops_without_reporting() -> None:
    t = setup(4)
    created = await t.jobs.create(JobRequest(snapshot_id=SNAPSHOT), "alice")
    claimed = await t.store.claim("replica-a", 60)
    assert claimed is not None
    t.store.jobs[created.job_id] = claimed.model_copy(update={"owner": "replica-b"})

    await t.jobs.run(claimed)

    job = t.store.jobs[created.job_id]
    assert (job.state, job.owner, job.done) == (JobState.RUNNING, "replica-b", 0)


async def test_a_job_whose_runners_keep_dying_is_failed_not_retried_forever() -> None:
    t = setup(4)
    created = await t.jobs.create(JobRequest(snapshot_id=SNAPSHOT), "alice")
    t.store.jobs[created.job_id] = created.model_copy(update={"attempts": 3})

    job = await t.claim_and_run()

    assert job.state is JobState.FAILED
    assert job.failure is not None
    assert job.failure.startswith("gave up after 3 attempts")


async def test_unknown_jobs_are_not_found() -> None:
    t = setup(1)

    with pytest.raises(JobNotFoundError):
        await t.jobs.get(uuid.uuid4())


async def test_the_runner_claims_queued_jobs_by_itself() -> None:
    t = setup(3)
    created = await t.jobs.create(JobRequest(snapshot_id=SNAPSHOT), "alice")

    started = await t.jobs.sweep()
    for task in list(t.jobs._running.values()):
        await task

    assert started == 1
    assert t.store.jobs[created.job_id].state is JobState.SUCCEEDED
    await t.jobs.stop()


async def test_a_stopping_replica_queues_its_running_job_again_without_using_an_attempt() -> None:
    t = setup(30)
    t.w.inference.down = True  # the job waits out the outage: still running at stop
    t.jobs = BatchJobs(
        t.store,
        t.w.predictor,
        t.snapshots,
        t.results,
        JobSettings(data_bucket=DATA, results_bucket="results", retries=100, retry_s=30),
        default_model_line=MODEL,
        replica="replica-a",
    )
    created = await t.jobs.create(JobRequest(snapshot_id=SNAPSHOT), "alice")
    await t.jobs.sweep()

    await t.jobs.stop()

    job = t.store.jobs[created.job_id]
    assert (job.state, job.owner, job.attempts) == (JobState.QUEUED, None, 0)
