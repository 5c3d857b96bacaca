import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from faststream.rabbit import RabbitBroker

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
