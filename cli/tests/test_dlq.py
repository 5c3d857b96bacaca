import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest
from faststream.rabbit import RabbitBroker, RabbitQueue
from typer.testing import CliRunner

import flywheel_cli.app as cli
from flywheel_cli.dlq import DlqError, failure_reason, non_empty, replay, replayed
from flywheel_contracts import LabelsSavedV1
from flywheel_runtime.errors import InvalidInputError
from flywheel_runtime.messaging import create_broker, publish_event, start_broker
from flywheel_runtime.topology import Topology
from flywheel_testing.rabbit import delete_names, queue_depth, unique_namespace
from flywheel_testing.wait import wait_for

pytestmark = pytest.mark.integration


def saved(project: str) -> LabelsSavedV1:
    example = LabelsSavedV1.example()
    return LabelsSavedV1(payload=example.payload.model_copy(update={"project_id": project}))


class Consumer:
    """A subscriber that refuses events until it is ``fixed``, like a service with a bug."""

    def __init__(self) -> None:
        self.fixed = False
        self.handled: list[LabelsSavedV1] = []


@pytest.fixture
async def poisoned(
    rabbit_url: str, topology: Topology
) -> AsyncIterator[tuple[RabbitBroker, Consumer, str, list[LabelsSavedV1]]]:
    """Three events rejected into the DLQ of a running consumer's queue."""
    broker = create_broker(rabbit_url, app_id="dlq-test")
    consumer = Consumer()
    queue = topology.queue("svc", LabelsSavedV1)

    @broker.subscriber(queue, topology.exchange_for(LabelsSavedV1))
    async def handle(event: LabelsSavedV1) -> None:
        if not consumer.fixed:
            raise InvalidInputError("not yet")
        consumer.handled.append(event)

    await start_broker(broker, topology)
    events = [saved(f"p{n}") for n in range(3)]
    for event in events:
        await publish_event(broker, topology, event)
    dlq = topology.dead_letter_queue(queue.name).name
    await wait_for(lambda: _depth_is(rabbit_url, dlq, 3), message="three dead letters")
    yield broker, consumer, queue.name, events
    await broker.stop()


async def _depth_is(url: str, queue: str, n: int) -> bool:
    return await queue_depth(url, queue) == n


async def test_replay_moves_dead_letters_back_with_their_ids_once_fixed(
    rabbit_url: str, poisoned: tuple[RabbitBroker, Consumer, str, list[LabelsSavedV1]]
) -> None:
    _, consumer, queue, events = poisoned
    consumer.fixed = True

    report = await replay(rabbit_url, queue)

    assert (report.found, report.moved) == (3, 3)
    assert {m.message_id for m in report.messages} == {str(e.event_id) for e in events}
    assert {m.reason for m in report.messages} == {"rejected"}
    await wait_for(lambda: _at_least(consumer.handled, 3), message="replayed events handled")
    assert sorted(e.event_id for e in consumer.handled) == sorted(e.event_id for e in events)
    assert await queue_depth(rabbit_url, f"{queue}.dlq") == 0


async def _at_least(items: list[LabelsSavedV1], n: int) -> bool:
    return len(items) >= n


async def test_dry_run_lists_ids_and_reason_and_moves_nothing(
    rabbit_url: str, poisoned: tuple[RabbitBroker, Consumer, str, list[LabelsSavedV1]]
) -> None:
    _, consumer, queue, events = poisoned
    consumer.fixed = True

    report = await replay(rabbit_url, f"{queue}.dlq", dry_run=True, limit=2)

    assert (report.dry_run, report.found, report.moved, len(report.messages)) == (True, 3, 0, 2)
    assert {m.message_id for m in report.messages} <= {str(e.event_id) for e in events}
    assert all(m.reason == "rejected" and m.type == "labels.saved" for m in report.messages)
    await wait_for(lambda: _depth_is(rabbit_url, f"{queue}.dlq", 3), message="all still there")
    assert consumer.handled == []


async def test_limit_moves_that_many_and_leaves_the_rest(
    rabbit_url: str, poisoned: tuple[RabbitBroker, Consumer, str, list[LabelsSavedV1]]
) -> None:
    broker, consumer, queue, _ = poisoned
    await broker.stop()  # nobody consumes: what moved waits in the queue

    report = await replay(rabbit_url, queue, limit=2)

    assert (report.found, report.moved) == (3, 2)
    assert await queue_depth(rabbit_url, queue) == 2
    assert await queue_depth(rabbit_url, f"{queue}.dlq") == 1
    assert consumer.handled == []


async def test_replay_into_a_queue_that_is_gone_fails_clearly_and_keeps_the_messages(
    rabbit_url: str, poisoned: tuple[RabbitBroker, Consumer, str, list[LabelsSavedV1]]
) -> None:
    broker, _, queue, _ = poisoned
    await broker.stop()
    await delete_names(rabbit_url, [queue], [])

    with pytest.raises(DlqError, match=r"does not exist.*3 dead letter\(s\) stay"):
        await replay(rabbit_url, queue)

    assert await queue_depth(rabbit_url, f"{queue}.dlq") == 3


async def test_a_missing_dead_letter_queue_is_a_clear_error(rabbit_url: str) -> None:
    with pytest.raises(DlqError, match=r"dead-letter queue .* does not exist"):
        await replay(rabbit_url, f"{unique_namespace()}svc.labels.saved")


async def test_an_unreachable_broker_is_a_clear_error() -> None:
    with pytest.raises(DlqError, match="RabbitMQ does not answer"):
        await replay("amqp://guest:guest@127.0.0.1:9/", "svc.labels.saved", timeout_s=2)


async def test_list_shows_only_queues_with_dead_letters(
    rabbit_url: str, poisoned: tuple[RabbitBroker, Consumer, str, list[LabelsSavedV1]]
) -> None:
    _, _, queue, _ = poisoned
    namespace = queue.removesuffix("svc.labels.saved")
    real = f"{namespace}validator.model.trained"
    await _declare(rabbit_url, real, dead=2)
    try:
        rows = await non_empty("http://127.0.0.1:1", rabbit_url, namespace)
    finally:
        await delete_names(rabbit_url, [real, f"{real}.dlq"], [])

    assert [(r.queue, r.dead_letter_queue, r.messages) for r in rows] == [(real, f"{real}.dlq", 2)]


async def _declare(url: str, queue: str, dead: int) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True)
        await channel.declare_queue(f"{queue}.dlq", durable=True)
        for n in range(dead):
            message = aio_pika.Message(
                b"{}",
                message_id=f"dead-{n}",
                type="model.trained",
                headers={"x-first-death-reason": "rejected", "x-delivery-count": 2},
            )
            await channel.default_exchange.publish(message, routing_key=f"{queue}.dlq")


def test_replayed_messages_keep_ids_type_and_headers_but_not_the_delivery_count() -> None:
    class Incoming:
        body = b'{"a": 1}'
        headers = {"x-death": [{"reason": "rejected", "count": 1}], "x-delivery-count": 3}
        content_type = "application/json"
        content_encoding = None
        priority = None
        correlation_id = "corr"
        reply_to = None
        message_id = "mid"
        timestamp = None
        type = "labels.saved"
        user_id = None
        app_id = "labeling"

    message = replayed(Incoming())  # type: ignore[arg-type]

    assert (message.body, message.message_id, message.correlation_id, message.type) == (
        b'{"a": 1}',
        "mid",
        "corr",
        "labels.saved",
    )
    assert message.headers == {"x-death": [{"reason": "rejected", "count": 1}]}
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert failure_reason(dict(message.headers)) == "rejected"


def test_cli_dry_run_then_replay_and_list(
    tmp_path: Path, rabbit_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLYWHEEL_RABBIT_URL", rabbit_url)
    namespace = unique_namespace()
    monkeypatch.setenv("FLYWHEEL_CLI_NAMESPACE", namespace)
    monkeypatch.setenv("FLYWHEEL_CLI_RABBIT_MANAGEMENT_URL", "http://127.0.0.1:1")
    queue = f"{namespace}validator.model.trained"
    asyncio.run(_declare(rabbit_url, queue, dead=2))
    runner = CliRunner()
    base = ["--base-dir", str(tmp_path)]
    try:
        listed = runner.invoke(cli.app, [*base, "dlq", "list", "--json"])
        dry = runner.invoke(cli.app, [*base, "dlq", "replay", queue, "--dry-run"])
        moved = runner.invoke(cli.app, [*base, "dlq", "replay", queue, "--limit", "1", "--json"])
        gone = runner.invoke(cli.app, [*base, "dlq", "replay", f"{namespace}nope.model.trained"])
        depth = asyncio.run(queue_depth(rabbit_url, queue))
    finally:
        asyncio.run(delete_names(rabbit_url, [queue, f"{queue}.dlq"], []))

    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.output)[0]["messages"] == 2
    assert dry.exit_code == 0, dry.output
    assert "would move 2 of 2" in dry.output
    assert "dead-0" in dry.output
    assert "reason=rejected" in dry.output
    assert moved.exit_code == 0, moved.output
    assert json.loads(moved.output)["moved"] == 1
    assert depth == 1
    assert gone.exit_code == 1
    assert "does not exist" in gone.output


async def test_a_per_replica_subscription_is_listed_and_replayed_once_into_every_live_replica(
    rabbit_url: str, topology: Topology
) -> None:
    broker = create_broker(rabbit_url, app_id="dlq-test", delivery_limit=topology.delivery_limit)
    consumers = {replica: Consumer() for replica in ("r1", "r2")}
    queues = [topology.replica_queue("inference-bff", LabelsSavedV1, r) for r in consumers]

    def subscribe(consumer: Consumer, queue: RabbitQueue) -> None:
        @broker.subscriber(queue, topology.exchange_for(LabelsSavedV1))
        async def handle(event: LabelsSavedV1) -> None:
            if not consumer.fixed:
                raise InvalidInputError("not yet")
            consumer.handled.append(event)

    for consumer, queue in zip(consumers.values(), queues, strict=True):
        subscribe(consumer, queue)
    await start_broker(broker, topology)
    subscription = f"{topology.namespace}inference-bff.labels.saved"
    try:
        events = [saved(f"p{n}") for n in range(2)]
        for event in events:
            await publish_event(broker, topology, event)
        # Each replica dead-letters its own copy of each event into the one shared DLQ.
        await wait_for(lambda: _depth_is(rabbit_url, f"{subscription}.dlq", 4), message="4 dead")

        rows = await non_empty("http://127.0.0.1:1", rabbit_url, topology.namespace)
        with pytest.raises(DlqError, match=r"does not exist.*4 dead letter\(s\) stay"):
            await replay(rabbit_url, subscription)  # nobody said where its replicas are
        for consumer in consumers.values():
            consumer.fixed = True
        report = await replay(
            rabbit_url, subscription, replicas=[*(q.name for q in queues), f"{subscription}.gone"]
        )

        async def each_replica_handled_both() -> bool:
            return all(len(c.handled) >= 2 for c in consumers.values())

        await wait_for(each_replica_handled_both, message="replayed into every replica")
    finally:
        await broker.stop()

    assert [(r.queue, r.dead_letter_queue, r.messages) for r in rows] == [
        (subscription, f"{subscription}.dlq", 4)
    ]
    assert report.targets == [q.name for q in queues]
    assert (report.found, report.moved) == (4, 4)
    for consumer in consumers.values():
        assert sorted(e.event_id for e in consumer.handled) == sorted(e.event_id for e in events)
    assert await queue_depth(rabbit_url, f"{subscription}.dlq") == 0
