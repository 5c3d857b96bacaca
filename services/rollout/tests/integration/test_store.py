import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from flywheel_rollout.adapters.repository import SqlStore
from flywheel_rollout.analysis import Window
from flywheel_rollout.main import MIGRATIONS
from flywheel_rollout.policy import CanaryPolicy
from flywheel_rollout.ports import Canary, CanaryFilter, CanaryState, TimelineEntry
from flywheel_runtime.db import Database
from flywheel_runtime.migrations import migrate
from flywheel_testing.wait import wait_for

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    schema = f"ro_{uuid.uuid4().hex[:10]}"
    await migrate(database_url, schema, MIGRATIONS)
    built = Database(database_url, schema)
    yield built
    await built.dispose()


@pytest.fixture
def store(db: Database) -> SqlStore:
    return SqlStore(db, consumer="rollout")


def canary(line: str = "digits", state: CanaryState = CanaryState.RUNNING) -> Canary:
    return Canary(
        rollout_id=uuid.uuid4(),
        validated_event_id=uuid.uuid4(),
        correlation_id=uuid.uuid4(),
        project_id="digits",
        model_line=line,
        registered_model=line,
        candidate_version="2",
        champion_version="1",
        state=state,
        policy=CanaryPolicy(),
        created_at=T0,
        interval_started_at=T0,
        step_started_at=T0,
    )


def sha(index: int) -> str:
    return hashlib.sha256(str(index).encode()).hexdigest()


async def test_remembered_inputs_and_log_claims_stay_bounded(store: SqlStore, db: Database) -> None:
    running = canary()
    async with store.transaction() as tx:
        await tx.add_canary(running)
        for index in range(30):
            await tx.remember(
                running.rollout_id, "2", sha(index), "7", T0 + timedelta(seconds=index)
            )
        await tx.remember(running.rollout_id, "1", sha(0), "3", T0)
        for _ in range(3):
            assert await tx.claim_log(uuid.uuid4())
        control_event = uuid.uuid4()
        assert await tx.claim(control_event)

    await store.prune(keep_recent=10, log_claims_before=datetime.now(UTC) + timedelta(minutes=1))

    async with store.transaction() as tx:
        kept = [await tx.recent_class(running.rollout_id, "2", sha(i)) for i in range(30)]
        assert kept == [None] * 20 + ["7"] * 10
        assert await tx.recent_class(running.rollout_id, "1", sha(0)) == "3"
        assert not await tx.claim(control_event)
        await tx.forget(running.rollout_id)
        assert await tx.recent_class(running.rollout_id, "1", sha(0)) is None
    async with db.transaction() as session:
        claims = await session.execute(
            text("SELECT consumer, count(*) FROM processed_messages GROUP BY consumer")
        )
        assert dict(claims.all()) == {"rollout": 1}


async def test_windows_round_trip_and_add_up_to_the_canarys_feedback(store: SqlStore) -> None:
    running = canary()
    first, second = Window(), Window()
    first.add_request(ok=True, latency_ms=12, error_code=None, outage_codes=())
    first.add_request(ok=False, latency_ms=0, error_code="timeout", outage_codes=("timeout",))
    first.add_feedback(corrected=True)
    second.add_feedback(corrected=False)
    second.add_pair(agree=True)
    async with store.transaction() as tx:
        await tx.add_canary(running)
        await tx.save_window(running.rollout_id, 0, "2", first)
        await tx.save_window(running.rollout_id, 1, "2", second)
        assert await tx.open_interval(running.rollout_id) == 0

    async with store.transaction() as tx:
        assert await tx.window(running.rollout_id, 0, "2") == first
        assert await tx.window(running.rollout_id, 0, "1") == Window()
        assert await tx.windows(running.rollout_id, 1) == {"2": second}
        totals = await tx.feedback(running.rollout_id)
    # Reading a window opens it (empty) so that concurrent writers lock the same row.
    assert totals.keys() == {"1", "2"}
    assert totals["1"] == Window()
    total = totals["2"]
    assert (total.requests, total.outage_errors, total.prefilled, total.corrected) == (2, 1, 2, 1)
    assert total.agreements == 1
    assert sum(total.latency_counts) == 1


async def test_the_database_allows_one_canary_in_progress_per_line(store: SqlStore) -> None:
    async with store.transaction() as tx:
        await tx.add_canary(canary())
        await tx.add_canary(canary(state=CanaryState.WAITING))
        await tx.add_canary(canary(line="letters"))

    with pytest.raises(IntegrityError):
        async with store.transaction() as tx:
            await tx.add_canary(canary(state=CanaryState.PAUSED))

    assert len(await store.canaries(CanaryFilter(model_line="digits"))) == 2


async def test_timeline_entries_of_an_unknown_project_join_its_line_once_learned(
    store: SqlStore,
) -> None:
    chain = uuid.uuid4()
    async with store.transaction() as tx:
        for kind, line in (("labels.saved", None), ("labels.saved", None)):
            await tx.record(
                TimelineEntry(
                    model_line=line,
                    project_id="digits",
                    correlation_id=chain,
                    kind=kind,
                    actor="labeling",
                    summary="labels",
                    at=T0,
                )
            )
    assert await store.timeline("digits-classifier", None, 10) == []

    async with store.transaction() as tx:
        await tx.learn_line("digits", "digits-classifier")
        assert await tx.lines_of("digits") == ["digits-classifier"]

    entries = await store.timeline("digits-classifier", chain, 10)
    assert [e.kind for e in entries] == ["labels.saved", "labels.saved"]
    assert entries[0].entry_id is not None
    assert entries[0].entry_id < (entries[1].entry_id or 0)


async def test_a_decision_waiting_for_its_canary_is_not_overtaken_by_later_logs(
    store: SqlStore, db: Database
) -> None:
    running = canary()
    async with store.transaction() as tx:
        await tx.add_canary(running)
    order: list[str] = []
    logging = asyncio.Event()
    release = asyncio.Event()

    async def log(name: str, *, hold: bool = False) -> None:
        async with store.transaction() as tx:
            assert await tx.open_interval(running.rollout_id) == 0
            order.append(name)
            logging.set()
            if hold:
                await release.wait()

    async def decide() -> None:
        async with store.transaction() as tx:
            assert await tx.lock_canary(running.rollout_id) is not None
            order.append("decision")

    async def waiting(count: int) -> bool:
        async with db.transaction() as session:
            found = await session.execute(text("SELECT count(*) FROM pg_locks WHERE NOT granted"))
            return int(found.scalar_one()) >= count

    first = asyncio.create_task(log("first log", hold=True))
    await wait_for(logging.wait, timeout=10)
    decision = asyncio.create_task(decide())
    await wait_for(lambda: waiting(1), timeout=10, message="the decision waiting")
    later = asyncio.create_task(log("later log"))
    await wait_for(
        lambda: waiting(2) if not later.done() else _true(), timeout=10, message="the later log"
    )
    release.set()
    await asyncio.gather(first, decision, later)

    assert order == ["first log", "decision", "later log"]


async def _true() -> bool:
    return True


async def test_logs_opening_the_same_window_at_once_both_count(store: SqlStore) -> None:
    running = canary()
    async with store.transaction() as tx:
        await tx.add_canary(running)
    inside = asyncio.Barrier(2)

    async def count_one() -> None:
        async with store.transaction() as tx:
            await inside.wait()  # both transactions are open before either touches the window
            window = await tx.window(running.rollout_id, 0, "2")
            await tx.save_window(
                running.rollout_id,
                0,
                "2",
                window.model_copy(update={"requests": window.requests + 1}),
            )

    await asyncio.wait_for(asyncio.gather(count_one(), count_one()), timeout=30)

    async with store.transaction() as tx:
        assert (await tx.windows(running.rollout_id, 0))["2"].requests == 2
