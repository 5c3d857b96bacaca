"""Poison events on every service queue: each lands in ``<queue>.dlq`` with its reason, the
queue keeps flowing, ``flywheel status`` shows the dead letters, and a replay after the fix is
handled.

The queues are the ones the running services declared for their subscriptions (every
``Topology.queue`` and ``Topology.replica_queue`` a service built), not a list kept here. A BFF
replica's own routing queue dead-letters into its subscription's shared ``<subscription>.dlq``,
which ``flywheel status`` and ``flywheel dlq`` list under the subscription's name. Poison goes
straight into one queue through the default exchange, so no other subscriber sees it.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from flywheel_cli.dlq import non_empty, replay
from flywheel_cli.queues import queue_report
from flywheel_contracts import ALL_EVENTS, Event, LabelsSavedV1
from flywheel_contracts.datasets import SnapshotSegment
from flywheel_runtime.datasets import SnapshotStore
from flywheel_runtime.storage import ObjectStorage
from flywheel_testing.rabbit import queue_depth
from flywheel_testing.wait import wait_for

from .conftest import MAX_MESSAGE_BYTES, Services

pytestmark = pytest.mark.integration

BY_ROUTING_KEY: dict[str, type[Event[Any]]] = {e.routing_key(): e for e in ALL_EVENTS}

NO_MANAGEMENT = "http://127.0.0.1:9"
"""Queue depths come from passive declares, as when the management plugin is off."""

NEEDS_MLFLOW = {"validator"}
"""Services whose good event needs MLflow (not started here): it must reach the handler,
past the poison, but cannot succeed."""


def event_of(services: Services, queue: str) -> type[Event[Any]]:
    owner = services.queues[queue]
    subscription = services.subscription(queue)
    return BY_ROUTING_KEY[subscription.removeprefix(services.topology.namespace + owner + ".")]


def replicas(services: Services, queue: str) -> list[str]:
    """Where a replay of ``queue``'s dead letters goes when it is a replica's own queue."""
    return [] if services.subscription(queue) == queue else [queue]


def poisons(event: type[Event[Any]]) -> dict[str, bytes]:
    """One message per way an event can be unreadable to its consumer."""
    good = event.example().model_dump(mode="json")
    return {
        "not-json": b"\x00not json {",
        "schema": json.dumps(
            {"type": event.TYPE, "schema_version": event.VERSION, "payload": {"nope": 1}}
        ).encode(),
        "unknown-version": json.dumps(good | {"schema_version": 99}).encode(),
        "unknown-type": json.dumps(good | {"type": "bogus.event"}).encode(),
        # A valid event padded past the size limit: refused unread, whatever it says.
        "too-large": json.dumps(good | {"padding": "x" * MAX_MESSAGE_BYTES}).encode(),
    }


KINDS = ("not-json", "schema", "unknown-version", "unknown-type", "too-large")
CONSUMER_REASONS = {"too-large": "too_large"}
"""The reason a consumer records per poison kind; ``rejected`` for the rest."""


def processed(services: Services, queue: str, status: str | None = None) -> float:
    """Messages a service's handler settled (FastStream's metric; the log worker's own)."""
    owner = services.queues[queue]
    registry = services.runtimes[owner].telemetry.registry
    if owner == "log-worker":
        return registry.get_sample_value("flywheel_logworker_rows_written_total") or 0.0
    total = 0.0
    for metric in registry.collect():
        for sample in metric.samples:
            if (
                sample.name == "faststream_received_processed_messages_total"
                and sample.labels.get("handler") == f"default.{queue}"
                and (status is None or sample.labels.get("status") == status)
            ):
                total += sample.value
    return total


async def write_segment(services: Services, event: LabelsSavedV1) -> None:
    """The snapshot segment labeling writes before it emits ``labels.saved``."""
    storage = ObjectStorage.from_settings(services.platform)
    try:
        await storage.ensure_buckets(services.bucket)
        await SnapshotStore(storage, bucket=services.bucket).write_segment(
            SnapshotSegment(
                snapshot_id=event.payload.snapshot_id,
                project_id=event.payload.project_id,
                parent_snapshot_id=None,
                batch_id=event.payload.batch_id,
                created_at=datetime.now(UTC),
                upserts=[],
            )
        )
    finally:
        storage.close()


def labels_saved(snapshot: str) -> LabelsSavedV1:
    example = LabelsSavedV1.example()
    payload = example.payload.model_copy(update={"snapshot_id": snapshot, "batch_id": uuid.uuid4()})
    return LabelsSavedV1(payload=payload)


async def test_poison_on_every_queue_is_dead_lettered_and_the_queues_keep_flowing(
    services: Services,
) -> None:
    queues = sorted(services.queues)
    owners = set(services.queues.values())
    assert {
        "data-monitor",
        "trainer-dispatch",
        "validator",
        "rollout",
        "log-worker",
        "inference-bff",
    } <= owners
    # The BFF replica's own rollout.step, canary.verdict and project.configured queues.
    per_replica = [q for q in queues if services.subscription(q) != q]
    assert len(per_replica) == 3, queues
    limit = services.topology.delivery_limit

    for queue in queues:
        for kind, body in poisons(event_of(services, queue)).items():
            await services.put(queue, body, message_id=f"poison-{kind}", type="poison")
    poisoned = len(queues) * len(KINDS)

    async def all_dead_lettered() -> bool:
        depths = [
            await queue_depth(services.rabbit_url, services.dead_letter_queue(q)) for q in queues
        ]
        return all(d >= len(KINDS) for d in depths)

    await wait_for(all_dead_lettered, timeout=30, message="poison in every DLQ")

    reasons: dict[str, int] = {}
    explained = 0
    for queue in queues:
        seen = await replay(
            services.rabbit_url,
            services.dead_letter_queue(queue),
            dry_run=True,
            replicas=replicas(services, queue),
        )
        assert sorted(m.message_id or "" for m in seen.messages) == sorted(
            f"poison-{kind}" for kind in KINDS
        ), queue
        for message in seen.messages:
            reasons[message.reason or "none"] = reasons.get(message.reason or "none", 0) + 1
            kind = (message.message_id or "").removeprefix("poison-")
            # Dead-lettered at its first delivery: never retried up to the delivery limit.
            assert message.reason == CONSUMER_REASONS.get(kind, "rejected"), (queue, message)
            assert message.deaths == 1
            # The consumer said why, in the message's headers.
            assert message.error, (queue, message)
            explained += 1
        assert seen.targets == [queue], seen
    within = sum(reasons.values())

    report = await queue_report(NO_MANAGEMENT, services.rabbit_url, services.topology.namespace)
    listed = {row.name: row.dlq_messages for row in report.queues}
    assert all(listed.get(services.subscription(q)) == len(KINDS) for q in queues), listed
    dlq_listed = {
        row.queue: row.messages
        for row in await non_empty(NO_MANAGEMENT, services.rabbit_url, services.topology.namespace)
    }
    assert all(dlq_listed.get(services.subscription(q)) == len(KINDS) for q in queues), dlq_listed
    status_listed = sum(1 for q in queues if listed.get(services.subscription(q)) == len(KINDS))

    # A good event right behind the poison is handled.
    before = {q: processed(services, q) for q in queues}
    snapshot = f"snap-{uuid.uuid4().hex[:6]}"
    good_labels = labels_saved(snapshot)
    await write_segment(services, good_labels)
    for queue in queues:
        event = event_of(services, queue)
        good = good_labels if event is LabelsSavedV1 else event.example()
        await services.put(
            queue,
            good.model_dump_json().encode(),
            message_id=str(good.event_id),
            correlation_id=str(good.correlation_id),
            type=good.type,
            content_type="application/json",
        )

    def handled(queue: str) -> bool:
        if services.queues[queue] in NEEDS_MLFLOW or services.queues[queue] == "log-worker":
            return processed(services, queue) > before[queue]
        return processed(services, queue, "acked") >= 1

    async def flowing() -> bool:
        return all(handled(q) for q in queues)

    await wait_for(flowing, timeout=30, message="good events handled behind the poison")
    acked = sum(1 for q in queues if services.queues[q] not in NEEDS_MLFLOW and handled(q))
    print(
        f"queues={len(queues)} services={len(owners)} poisoned={poisoned} "
        f"dlq_within_deliveries={within}/{poisoned} (limit {limit}, reasons {reasons}) "
        f"with_error_header={explained} "
        f"status_dlq_listed={status_listed}/{len(queues)} dlq_listed={len(dlq_listed)} "
        f"per_replica_queues={len(per_replica)} "
        f"flowing=ok acked={acked} reached_without_mlflow={len(queues) - acked}"
    )


async def test_an_event_that_failed_until_the_fix_is_handled_when_replayed(
    services: Services,
) -> None:
    queue = next(
        q
        for q, owner in services.queues.items()
        if owner == "data-monitor" and event_of(services, q) is LabelsSavedV1
    )
    limit = services.topology.delivery_limit
    # Its snapshot segment is missing: retried up to the delivery limit, then dead-lettered.
    event = labels_saved(f"snap-{uuid.uuid4().hex[:6]}")
    await services.put(
        queue,
        event.model_dump_json().encode(),
        message_id=str(event.event_id),
        correlation_id=str(event.correlation_id),
        type=event.type,
        content_type="application/json",
    )

    async def dead() -> bool:
        return await queue_depth(services.rabbit_url, f"{queue}.dlq") == 1

    await wait_for(dead, timeout=30, message="failing event in the DLQ")
    failed = processed(services, queue, "nacked")
    assert failed <= limit + 1
    seen = await replay(services.rabbit_url, queue, dry_run=True)
    [message] = seen.messages
    assert (message.message_id, message.reason) == (str(event.event_id), "delivery_limit")

    await write_segment(services, event)  # the fix
    moved = await replay(services.rabbit_url, queue)
    assert moved.moved == 1

    async def handled() -> bool:
        return processed(services, queue, "acked") >= 1

    await wait_for(handled, timeout=20, message="replayed event handled")
    assert await queue_depth(services.rabbit_url, f"{queue}.dlq") == 0
    print(
        f"queue={queue.removeprefix(services.topology.namespace)} deliveries_before_dlq="
        f"{failed:.0f} (delivery limit {limit}: at most {limit + 1}) reason={message.reason} "
        f"replayed={moved.moved} handled=ok"
    )
