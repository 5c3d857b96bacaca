from datetime import datetime

import httpx
import pytest

from flywheel_contracts import (
    DataQualityFailedV1,
    LabelsSavedV1,
    ThresholdReachedV1,
)
from flywheel_contracts.events import ThresholdReason
from flywheel_testing.proxy import TcpProxy
from flywheel_testing.rabbit import drain, queue_depth
from flywheel_testing.s3 import S3Server
from flywheel_testing.wait import wait_for

from .conftest import World, processed

pytestmark = pytest.mark.integration

# --- exactly once -------------------------------------------------------------------------------


async def test_two_instances_fire_exactly_one_threshold_for_many_batches(world: World) -> None:
    first, second = await world.start(2)
    labeling = world.labeling
    await labeling.publish(labeling.configured(count=1000))

    async def configured() -> bool:
        state = await world.get("/state")
        return state.status_code == 200 and state.json()["config_revision"] == 1

    await wait_for(configured, message="project configured")
    batches = [await labeling.batch(40) for _ in range(30)]
    # Labeling re-emitting a batch under a new event id must not count it twice either.
    copies = [LabelsSavedV1(payload=b.payload, correlation_id=b.correlation_id) for b in batches]
    await labeling.publish(*batches, *copies)

    async def all_handled() -> bool:
        return processed(first) + processed(second) >= 1 + 60

    await wait_for(all_handled, timeout=30, message="every batch and copy handled")
    await world.wait_outbox_empty()
    await world.probe.collect()

    [fired] = world.probe.of(ThresholdReachedV1)
    assert fired.payload.reason is ThresholdReason.COUNT
    assert fired.payload.labels_since_last == 1000
    assert fired.payload.threshold == 1000
    assert fired.payload.model_line == f"{labeling.project}-classifier"
    assert fired.payload.excluded_label_ids == []
    assert processed(first) >= 1
    assert processed(second) >= 1
    assert await world.reports() == 30
    state = (await world.get("/state", app=second)).json()
    assert state["head_sequence"] == 30
    # Batches handled after the fire but already inside its snapshot were trained on: not counted.
    assert state["pending"]["labels"] == 40 * (30 - state["trained_sequence"])
    counted = await world.scalar(
        "SELECT sum(label_count) FROM quality_reports WHERE counted AND project_id = :p",
        p=labeling.project,
    )
    assert counted == 1000 + state["pending"]["labels"]
    assert state["trained_snapshot_id"] == fired.payload.snapshot_id
    [decision] = (await world.get("/decisions")).json()["decisions"]
    assert decision["decision_id"] == str(fired.payload.decision_id)
    assert decision["evaluation"]["pending_labels"] == 1000
    by_id = {b.event_id: b for b in [*batches, *copies]}
    assert fired.causation_id in by_id
    assert fired.correlation_id == by_id[fired.causation_id].correlation_id


async def test_redelivered_events_change_nothing(world: World) -> None:
    [app] = await world.start()
    labeling = world.labeling
    configured = labeling.configured(count=100)
    await labeling.publish(configured)
    batches = [await labeling.batch(40) for _ in range(3)]

    await labeling.publish(*batches, *batches, configured)
    await labeling.publish(*batches)

    async def all_handled() -> bool:
        return (
            processed(app) >= 11
            and await queue_depth(world.rabbit_url, world.queue(LabelsSavedV1)) == 0
        )

    await wait_for(all_handled, message="every copy handled")
    await world.wait_outbox_empty()
    await world.probe.collect()

    [fired] = world.probe.of(ThresholdReachedV1)
    assert fired.payload.labels_since_last == 120
    assert await world.reports() == 3
    assert await world.scalar("SELECT count(*) FROM decisions") == 1
    state = (await world.get("/state")).json()
    assert state["pending"]["labels"] == 0


# --- timer --------------------------------------------------------------------------------------


async def test_max_wait_fires_through_the_timer_with_few_labels(world: World) -> None:
    await world.start()
    labeling = world.labeling
    await labeling.publish(labeling.configured(count=1000, max_wait_s=1))
    batch = await labeling.batch(5)
    await labeling.publish(batch)

    [fired] = await world.probe.wait(ThresholdReachedV1)

    assert fired.payload.reason is ThresholdReason.MAX_WAIT
    assert fired.payload.labels_since_last == 5
    assert fired.causation_id == batch.event_id
    [decision] = (await world.get("/decisions")).json()["decisions"]
    assert decision["trigger"] == "timer"
    assert decision["evaluation"]["oldest_pending_age_s"] >= 1
    assert datetime.fromisoformat(decision["decided_at"]) >= batch.occurred_at


async def test_cooldown_defers_the_next_retrain_until_the_timer_sees_it_end(
    world: World,
) -> None:
    await world.start()
    labeling = world.labeling
    await labeling.publish(labeling.configured(count=20, cooldown_s=3))
    await labeling.publish(await labeling.batch(20))
    await world.probe.wait(ThresholdReachedV1)

    await labeling.publish(await labeling.batch(20))
    await world.wait_reports(2)
    state = (await world.get("/state")).json()
    [first, second] = await world.probe.wait(ThresholdReachedV1, n=2)

    assert state["pending"]["labels"] == 20
    assert state["last_evaluation"]["in_cooldown"]
    assert state["last_evaluation"]["due_reason"] == "count"
    assert first.payload.snapshot_id != second.payload.snapshot_id
    later, earlier = (await world.get("/decisions")).json()["decisions"]
    assert earlier["trigger"] == "labels.saved"
    assert later["trigger"] == "timer"
    elapsed = datetime.fromisoformat(later["decided_at"]) - datetime.fromisoformat(
        earlier["decided_at"]
    )
    assert elapsed.total_seconds() >= 3


# --- adaptive -----------------------------------------------------------------------------------


async def test_adaptive_policy_fires_early_when_labelers_correct_many_prefills(
    world: World,
) -> None:
    await world.start()
    labeling = world.labeling
    adaptive = {"enabled": True, "min_prefilled": 20, "min_count": 10, "sensitivity": 2.0}
    await labeling.publish(labeling.configured(count=100, adaptive=adaptive))
    await labeling.publish(await labeling.batch(30, prefilled=30, corrected=0))
    await world.wait_reports(1)
    assert world.probe.of(ThresholdReachedV1) == []

    await labeling.publish(await labeling.batch(30, prefilled=30, corrected=24))
    [fired] = await world.probe.wait(ThresholdReachedV1)

    assert fired.payload.reason is ThresholdReason.ADAPTIVE
    assert fired.payload.labels_since_last == 60
    assert fired.payload.threshold == 30
    [decision] = (await world.get("/decisions")).json()["decisions"]
    assert decision["evaluation"]["correction_rate"] == pytest.approx(0.4)
    assert decision["evaluation"]["threshold"] == 100


# --- quality ------------------------------------------------------------------------------------


async def test_a_quarantined_batch_is_not_counted_and_is_excluded_from_the_next_retrain(
    world: World,
) -> None:
    await world.start()
    labeling = world.labeling
    await labeling.publish(labeling.configured(count=100))
    bad = await labeling.batch(30, classes=["7"], labeler="mallory")
    await labeling.publish(bad)

    [failed] = await world.probe.wait(DataQualityFailedV1)
    state = (await world.get("/state")).json()
    await labeling.publish(await labeling.batch(100))
    [fired] = await world.probe.wait(ThresholdReachedV1)

    assert failed.causation_id == bad.event_id
    assert sorted(failed.payload.quarantined_label_ids) == sorted(bad.payload.label_ids)
    assert any("labeler 'mallory' gave class '7'" in r for r in failed.payload.reasons)
    assert state["pending"]["labels"] == 0
    assert state["quarantined_labels"] == 30
    assert fired.payload.labels_since_last == 100
    assert sorted(fired.payload.excluded_label_ids) == sorted(bad.payload.label_ids)
    reports = (await world.get("/quality-reports")).json()["reports"]
    quarantined = next(r for r in reports if r["quarantined"])
    assert quarantined["report_id"] == str(failed.payload.report_id)
    assert {c["name"]: c["passed"] for c in quarantined["checks"]}["labeler_anomaly"] is False


async def test_s3_unreachable_redelivers_the_batch_until_it_can_be_checked(
    world: World, s3_server: S3Server
) -> None:
    host, port = s3_server.endpoint.rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    world.stack.push_async_callback(proxy.stop)
    platform = world.platform.model_copy(
        update={"s3_endpoint": f"127.0.0.1:{proxy.port}", "delivery_limit": 50}
    )
    [app] = await world.start(platform=platform)
    labeling = world.labeling
    await labeling.publish(labeling.configured(count=1000))
    batch = await labeling.batch(25)
    await proxy.stop()

    await labeling.publish(batch)

    async def redelivered() -> bool:
        return processed(app) >= 3

    await wait_for(redelivered, timeout=30, message="batch redelivered while S3 is away")
    assert await world.reports() == 0
    await proxy.start()
    await world.wait_reports(1, within=30)
    state = (await world.get("/state")).json()
    assert state["pending"]["labels"] == 25
    dlq = world.runtime.topology.dead_letter_queue(world.queue(LabelsSavedV1)).name
    assert await queue_depth(world.rabbit_url, dlq) == 0


# --- dead letters and the API -------------------------------------------------------------------


async def test_a_malformed_labels_saved_goes_to_the_dead_letter_queue(world: World) -> None:
    await world.start()
    broker = world.labeling.broker
    await broker.publish(
        {"type": "labels.saved", "payload": {"project_id": world.labeling.project}},
        exchange=world.topology.exchange_for(LabelsSavedV1),
        routing_key=LabelsSavedV1.routing_key(),
        message_id="malformed-1",
    )
    dlq = world.runtime.topology.dead_letter_queue(world.queue(LabelsSavedV1)).name

    async def dead_lettered() -> bool:
        return await queue_depth(world.rabbit_url, dlq) >= 1

    await wait_for(dead_lettered, message="malformed event dead-lettered")
    [dead] = await drain(world.rabbit_url, dlq)
    assert dead.message_id == "malformed-1"
    assert (await world.get("/state")).status_code == 404


async def test_unknown_project_answers_404(world: World) -> None:
    await world.start()

    responses = [await world.get(p) for p in ("/state", "/decisions", "/quality-reports")]

    assert [r.status_code for r in responses] == [404, 404, 404]
    assert responses[0].json()["error"]["code"] == "project_not_found"
    transport = httpx.ASGITransport(app=world.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        ready = await client.get("/readyz")
    assert ready.json()["checks"] == {"broker": "ok", "database": "ok", "s3": "ok"}
