import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from flywheel_contracts.datasets import Split
from flywheel_inference_bff.adapters.repository import SqlJobStore, SqlRouteStore
from flywheel_inference_bff.main import MIGRATIONS
from flywheel_inference_bff.ports import BatchJob, JobError, JobState, Progress
from flywheel_inference_bff.routing import LineRoute
from flywheel_runtime.db import Database
from flywheel_runtime.migrations import migrate

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    schema = f"bff_{uuid.uuid4().hex[:10]}"
    await migrate(database_url, schema, MIGRATIONS)
    database = Database(database_url, schema)
    yield database
    await database.dispose()


def job(created_at: datetime = T0) -> BatchJob:
    job_id = uuid.uuid4()
    return BatchJob(
        job_id=job_id,
        state=JobState.QUEUED,
        project_id="digits",
        snapshot_id="snap-1",
        splits=[Split.TRAIN, Split.TEST],
        model_line="digits-classifier",
        registered_model="digits-classifier",
        model_version="3",
        chunk_size=64,
        results_bucket="flywheel-data",
        results_prefix=f"pseudo-labels/{job_id}/",
        requested_by="alice",
        created_at=created_at,
        updated_at=created_at,
    )


async def test_jobs_are_claimed_once_oldest_first_and_written_only_by_their_owner(
    db: Database,
) -> None:
    store = SqlJobStore(db)
    older, newer = job(T0), job(T0 + timedelta(seconds=1))
    await store.create(newer)
    await store.create(older)

    first = await store.claim("replica-a", lease_s=60)
    second = await store.claim("replica-b", lease_s=60)
    none_left = await store.claim("replica-c", lease_s=60)
    progress = Progress(
        total=10,
        done=4,
        errors=1,
        next_chunk=1,
        error_samples=[JobError(image_key="k", code="invalid_image", message="bad")],
    )
    by_owner = await store.progress(older.job_id, "replica-a", progress)
    by_stranger = await store.progress(older.job_id, "replica-b", progress)
    finished = await store.finish(older.job_id, "replica-a", JobState.SUCCEEDED)
    again = await store.finish(older.job_id, "replica-a", JobState.FAILED, "late")

    assert first is not None and second is not None  # noqa: PT018 - both claims, one line
    assert (first.job_id, first.owner, first.attempts) == (older.job_id, "replica-a", 1)
    assert second.job_id == newer.job_id
    assert none_left is None
    assert (by_owner, by_stranger, finished, again) == (True, False, True, False)
    stored = await store.get(older.job_id)
    assert stored is not None
    assert (stored.state, stored.total, stored.done, stored.errors) == (
        JobState.SUCCEEDED,
        10,
        4,
        1,
    )
    assert stored.error_samples == progress.error_samples
    assert stored.splits == [Split.TRAIN, Split.TEST]
    assert stored.finished_at is not None
    assert await store.get(uuid.uuid4()) is None


async def test_a_running_job_whose_owner_went_quiet_is_taken_over(db: Database) -> None:
    store = SqlJobStore(db)
    created = job()
    await store.create(created)
    claimed = await store.claim("replica-a", lease_s=60)
    assert claimed is not None

    fresh = await store.claim("replica-b", lease_s=60)
    async with db.transaction() as session:
        await session.execute(
            text("UPDATE batch_jobs SET heartbeat_at = now() - interval '2 minutes'")
        )
    taken = await store.claim("replica-b", lease_s=60)
    lost = await store.progress(
        created.job_id,
        "replica-a",
        Progress(total=1, done=0, errors=0, next_chunk=0, error_samples=[]),
    )

    released = await store.release(created.job_id, "replica-b")
    again = await store.claim("replica-c", lease_s=60)

    assert fresh is None
    assert released
    assert again is not None
    assert (again.owner, again.attempts) == ("replica-c", 2)
    assert taken is not None
    assert (taken.owner, taken.attempts) == ("replica-b", 2)
    assert lost is False


async def test_routes_keep_the_newest_whatever_order_replicas_store_them(db: Database) -> None:
    store = SqlRouteStore(db)

    def route(percent: int, at: datetime, sequence: int) -> LineRoute:
        return LineRoute(
            model_line="digits-classifier",
            registered_model="digits-classifier",
            champion_version="1",
            candidate_version="2",
            candidate_percent=percent,
            occurred_at=at,
            sequence=sequence,
            rollout_id=uuid.UUID(int=5),
        )

    await store.save_route(route(50, T0, 2))
    await store.save_route(route(10, T0, 1))  # an older step stored late by another replica
    await store.save_project("digits-classifier", "digits")
    await store.save_project("digits-classifier", "handwriting")

    [stored] = await store.load_routes()
    assert stored == route(50, T0, 2)
    await store.save_route(route(90, T0 + timedelta(seconds=1), 0))
    [newest] = await store.load_routes()
    assert newest.candidate_percent == 90
    assert await store.load_projects() == {"digits-classifier": "handwriting"}
