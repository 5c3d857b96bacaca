import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from faststream.rabbit import RabbitBroker, RabbitQueue

from flywheel_contracts import LabelsSavedV1
from flywheel_runtime.errors import InvalidInputError, RetryableError
from flywheel_runtime.messaging import create_broker, publish_event, start_broker
from flywheel_runtime.topology import Topology
from flywheel_testing.rabbit import drain, queue_depth
from flywheel_testing.wait import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
async def broker(rabbit_url: str) -> AsyncIterator[RabbitBroker]:
    built = create_broker(rabbit_url, app_id="test")
    yield built
    await built.stop()


def _saved(project: str = "digits") -> LabelsSavedV1:
    example = LabelsSavedV1.example()
    return LabelsSavedV1(
        payload=example.payload.model_copy(update={"project_id": project}),
    )


async def test_published_event_arrives_typed(broker: RabbitBroker, topology: Topology) -> None:
    received: list[LabelsSavedV1] = []

    @broker.subscriber(topology.queue("svc", LabelsSavedV1), topology.exchange_for(LabelsSavedV1))
    async def handle(event: LabelsSavedV1) -> None:
        received.append(event)

    await start_broker(broker, topology)
    sent = _saved()
    await publish_event(broker, topology, sent)

    await wait_for(lambda: _ready(received), message="event delivered")
    assert received == [sent]
    assert isinstance(received[0].payload.batch_id, uuid.UUID)


async def _ready(items: list[object], n: int = 1) -> bool:
    return len(items) >= n


async def test_invalid_payload_is_dead_lettered_at_once(
    broker: RabbitBroker, topology: Topology, rabbit_url: str
) -> None:
    calls: list[str] = []
    queue = topology.queue("svc", LabelsSavedV1)

    @broker.subscriber(queue, topology.exchange_for(LabelsSavedV1))
    async def handle(event: LabelsSavedV1) -> None:
        calls.append(event.payload.project_id)

    await start_broker(broker, topology)
    await broker.publish(
        {"type": "labels.saved", "payload": {"project_id": "x"}},
        exchange=topology.exchange_for(LabelsSavedV1),
        routing_key=LabelsSavedV1.routing_key(),
        message_id="malformed-1",
    )
    await broker.publish(
        b"\x00not json",
        exchange=topology.exchange_for(LabelsSavedV1),
        routing_key=LabelsSavedV1.routing_key(),
        message_id="malformed-2",
    )
    await publish_event(broker, topology, _saved("after-bad"))

    dlq = topology.dead_letter_queue(queue.name).name
    await wait_for(lambda: _depth_at_least(rabbit_url, dlq, 2), message="two messages in DLQ")
    await wait_for(lambda: _ready(calls), message="good message handled")
    dead = await drain(rabbit_url, dlq)
    assert sorted(m.message_id or "" for m in dead) == ["malformed-1", "malformed-2"]
    assert calls == ["after-bad"]
    assert await queue_depth(rabbit_url, queue.name) == 0


async def _depth_at_least(url: str, queue: str, n: int) -> bool:
    return await queue_depth(url, queue) >= n


async def test_non_retryable_error_is_dead_lettered_at_once(
    broker: RabbitBroker, topology: Topology, rabbit_url: str
) -> None:
    calls: Counter[str] = Counter()
    queue = topology.queue("svc", LabelsSavedV1)

    @broker.subscriber(queue, topology.exchange_for(LabelsSavedV1))
    async def handle(event: LabelsSavedV1) -> None:
        calls[event.payload.project_id] += 1
        raise InvalidInputError("class 'cat' is not in the project")

    await start_broker(broker, topology)
    await publish_event(broker, topology, _saved("bad-class"))

    dlq = topology.dead_letter_queue(queue.name).name
    await wait_for(lambda: _depth_at_least(rabbit_url, dlq, 1), message="message in DLQ")
    assert calls == {"bad-class": 1}


async def test_retryable_error_is_redelivered_then_dead_lettered_while_others_flow(
    broker: RabbitBroker, topology: Topology, rabbit_url: str
) -> None:
    calls: Counter[str] = Counter()
    queue = topology.queue("svc", LabelsSavedV1)

    @broker.subscriber(queue, topology.exchange_for(LabelsSavedV1))
    async def handle(event: LabelsSavedV1) -> None:
        calls[event.payload.project_id] += 1
        if event.payload.project_id == "flaky":
            raise RetryableError("database is restarting")

    await start_broker(broker, topology)
    await publish_event(broker, topology, _saved("flaky"))
    await asyncio.gather(*(publish_event(broker, topology, _saved(f"ok-{i}")) for i in range(20)))

    dlq = topology.dead_letter_queue(queue.name).name
    await wait_for(lambda: _depth_at_least(rabbit_url, dlq, 1), message="flaky message in DLQ")
    assert calls["flaky"] == topology.delivery_limit + 1
    assert all(calls[f"ok-{i}"] == 1 for i in range(20))
    dead = await drain(rabbit_url, dlq)
    assert len(dead) == 1
    assert LabelsSavedV1.model_validate_json(dead[0].body).payload.project_id == "flaky"


async def test_replica_queues_dead_letter_into_one_shared_queue_that_outlives_them(
    rabbit_url: str, topology: Topology
) -> None:
    # Classic queues count no deliveries: the middleware's own count applies the limit.
    broker = create_broker(rabbit_url, app_id="test", delivery_limit=topology.delivery_limit)
    calls: Counter[tuple[str, str]] = Counter()
    replicas = [topology.replica_queue("svc", LabelsSavedV1, r) for r in ("r1", "r2")]

    def subscribe(replica: str, queue: RabbitQueue) -> None:
        @broker.subscriber(queue, topology.exchange_for(LabelsSavedV1))
        async def handle(event: LabelsSavedV1) -> None:
            calls[replica, event.payload.project_id] += 1
            if event.payload.project_id == "flaky":
                raise RetryableError("database is restarting")
            if event.payload.project_id == "bad":
                raise InvalidInputError("class 'cat' is not in the project")

    for replica, queue in zip(("r1", "r2"), replicas, strict=True):
        subscribe(replica, queue)
    await start_broker(broker, topology)
    try:
        for project in ("flaky", "bad", "ok"):
            await publish_event(broker, topology, _saved(project))
        dlq = topology.dead_letter_queue(replicas[0].name).name
        await wait_for(lambda: _depth_at_least(rabbit_url, dlq, 4), message="four dead letters")
        await wait_for(lambda: _ready([c for c in calls if c[1] == "ok"], 2), message="ok")
    finally:
        await broker.stop()

    # The replicas are gone with their connection; their dead letters are not.
    dead = await drain(rabbit_url, dlq)
    described = sorted(
        (
            LabelsSavedV1.model_validate_json(m.body).payload.project_id,
            str((m.headers or {})["x-flywheel-queue"]),
            str((m.headers or {})["x-flywheel-reason"]),
            (m.headers or {})["x-flywheel-deliveries"],
        )
        for m in dead
    )
    limit = topology.delivery_limit
    assert described == [
        ("bad", replicas[0].name, "rejected", 1),
        ("bad", replicas[1].name, "rejected", 1),
        ("flaky", replicas[0].name, "delivery_limit", limit + 1),
        ("flaky", replicas[1].name, "delivery_limit", limit + 1),
    ]
    assert calls == {
        **{(r, "flaky"): limit + 1 for r in ("r1", "r2")},
        **{(r, p): 1 for r in ("r1", "r2") for p in ("bad", "ok")},
    }
