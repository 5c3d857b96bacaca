import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from flywheel_contracts import InferenceLoggedV1
from flywheel_inference_bff.logworker.layout import decode
from flywheel_inference_bff.logworker.worker import Batch, LogWorker, WorkerMetrics
from flywheel_inference_bff.logworker.writer import ParquetBatchWriter
from flywheel_runtime.errors import DependencyUnavailableError
from flywheel_testing.wait import wait_for

BUCKET = "logs"


def event(model_line: str = "line-a", served_at: str = "2026-01-01T10:00:00Z") -> InferenceLoggedV1:
    return InferenceLoggedV1.model_validate(
        {
            "payload": InferenceLoggedV1.EXAMPLE
            | {"model_line": model_line, "request_id": uuid.uuid4(), "served_at": served_at}
        }
    )


@dataclass
class FakeDelivery:
    body: bytes
    message_id: str | None = None
    acks: int = 0
    rejects: list[bool] = field(default_factory=list)

    async def ack(self, multiple: bool = False) -> None:
        # A multiple ack would also settle messages of the next batch.
        assert not multiple
        self.acks += 1

    async def reject(self, requeue: bool = False) -> None:
        self.rejects.append(requeue)


def delivery(e: InferenceLoggedV1) -> FakeDelivery:
    return FakeDelivery(e.model_dump_json().encode(), str(e.event_id))


@dataclass
class FakeStorage:
    objects: dict[str, bytes] = field(default_factory=dict)
    buckets: set[str] = field(default_factory=set)
    content_types: set[str] = field(default_factory=set)
    metadata: list[Mapping[str, str] | None] = field(default_factory=list)
    down: bool = False
    puts: int = 0
    gate: asyncio.Event | None = None
    """When set, writes wait for it: a slow S3."""

    async def ensure_buckets(self, *names: str) -> None:
        self._answer()
        self.buckets.update(names)

    async def put(
        self,
        bucket: str,
        key: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self._answer()
        assert bucket in self.buckets
        if self.gate is not None:
            await self.gate.wait()
        self.puts += 1
        self.objects[key] = data
        self.content_types.add(content_type)
        self.metadata.append(metadata)

    def _answer(self) -> None:
        if self.down:
            raise DependencyUnavailableError("object storage is unavailable")

    def event_ids(self) -> list[str]:
        return [
            i for data in self.objects.values() for i in decode(data).column("event_id").to_pylist()
        ]


@dataclass
class FakeClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    worker: LogWorker
    storage: FakeStorage
    registry: CollectorRegistry
    clock: FakeClock

    def metric(self, name: str) -> float:
        return self.registry.get_sample_value(f"flywheel_logworker_{name}") or 0.0


@pytest.fixture
async def make() -> AsyncIterator[Any]:
    started: list[LogWorker] = []

    def build(
        batch_size: int = 100, max_wait_s: float = 3600.0, *, real_clock: bool = False
    ) -> Harness:
        storage, registry, clock = FakeStorage(), CollectorRegistry(), FakeClock()
        worker = LogWorker(
            ParquetBatchWriter(storage, BUCKET),
            WorkerMetrics.create(registry),
            batch_size=batch_size,
            max_wait_s=max_wait_s,
            retry_initial_s=0.01,
            retry_max_s=0.02,
            **({} if real_clock else {"clock": clock}),
        )
        worker.start()
        started.append(worker)
        return Harness(worker, storage, registry, clock)

    yield build
    for worker in started:
        await worker.stop(1.0)


async def until(condition: Any, message: str) -> None:
    async def check() -> bool:
        return bool(condition())

    await wait_for(check, timeout=5, message=message)


# --- flush rules --------------------------------------------------------------------------------


def test_a_batch_is_due_when_full_or_old_and_has_no_deadline_while_empty() -> None:
    batch = Batch(size=2, max_wait_s=10)
    e = event()

    assert batch.time_left(100) is None
    assert not batch.due(10_000)
    batch.add(e, delivery(e), received_at=100)
    assert batch.time_left(104) == 6
    assert not batch.due(109.9)
    assert batch.due(110)
    batch.add(e, delivery(e), received_at=101)
    assert batch.due(101)


async def test_a_full_batch_is_written_and_acknowledged_without_waiting(make: Any) -> None:
    h = make(batch_size=3)
    events = [event() for _ in range(4)]
    deliveries = [delivery(e) for e in events]

    for d in deliveries:
        await h.worker.deliver(d)

    await until(lambda: h.metric("batches_written_total") == 1, "first batch written")
    assert sorted(h.storage.event_ids()) == sorted(str(e.event_id) for e in events[:3])
    assert [d.acks for d in deliveries] == [1, 1, 1, 0]
    assert h.worker.pending == 1
    assert h.metric("rows_written_total") == 3


async def test_a_batch_is_written_once_its_first_message_is_max_wait_old(make: Any) -> None:
    h = make(batch_size=100, max_wait_s=3600)
    events = [event() for _ in range(3)]

    await h.worker.deliver(delivery(events[0]))
    await until(lambda: h.metric("batch_messages") == 1, "first message batched")
    h.clock.now = 1000
    await h.worker.deliver(delivery(events[1]))
    await until(lambda: h.metric("batch_messages") == 2, "second message batched")
    h.clock.now = 3600
    await h.worker.deliver(delivery(events[2]))

    await until(lambda: h.metric("batches_written_total") == 1, "aged batch written")
    # One batch of three: neither the first nor the second message made it due on its own.
    assert len(h.storage.objects) == 1
    assert len(h.storage.event_ids()) == 3
    assert h.worker.pending == 0


async def test_messages_that_aged_during_a_slow_write_still_fill_the_next_batch(make: Any) -> None:
    h = make(batch_size=3, max_wait_s=10)
    h.storage.gate = asyncio.Event()
    for _ in range(3):
        await h.worker.deliver(delivery(event()))
    await until(
        lambda: h.storage.puts == 0 and h.metric("batch_messages") == 3, "first batch writing"
    )
    for _ in range(4):
        await h.worker.deliver(delivery(event()))
    h.clock.now = 100

    h.storage.gate.set()

    await until(lambda: h.metric("rows_written_total") == 7, "every message written")
    assert h.metric("batches_written_total") == 3
    assert sorted(len(decode(data)) for data in h.storage.objects.values()) == [1, 3, 3]


async def test_a_lone_message_is_written_after_max_wait_on_the_real_clock(make: Any) -> None:
    h = make(batch_size=100, max_wait_s=0.05, real_clock=True)
    e = event()
    d = delivery(e)

    await h.worker.deliver(d)

    await until(lambda: d.acks == 1, "lone message acknowledged")
    assert h.storage.event_ids() == [str(e.event_id)]


async def test_one_file_per_line_and_hour_all_named_by_the_batch(make: Any) -> None:
    h = make(batch_size=4)
    events = [
        event("line-a", "2026-01-01T10:00:00Z"),
        event("line-a", "2026-01-01T11:00:00Z"),
        event("line-b", "2026-01-01T10:00:00Z"),
        event("line-b", "2026-01-01T10:30:00Z"),
    ]

    for e in events:
        await h.worker.deliver(delivery(e))

    await until(lambda: h.metric("batches_written_total") == 1, "batch written")
    prefixes = sorted(key.rsplit("/", 1)[0] for key in h.storage.objects)
    assert prefixes == [
        "inference/model_line=line-a/date=2026-01-01/hour=10",
        "inference/model_line=line-a/date=2026-01-01/hour=11",
        "inference/model_line=line-b/date=2026-01-01/hour=10",
    ]
    assert len({key.rsplit("/", 1)[1] for key in h.storage.objects}) == 1
    assert h.metric("files_written_total") == 3


# --- malformed messages -------------------------------------------------------------------------


async def test_malformed_messages_are_dead_lettered_at_once_and_never_block_a_batch(
    make: Any,
) -> None:
    h = make(batch_size=2)
    not_json = FakeDelivery(b"\xff not json")
    wrong_shape = FakeDelivery(json.dumps({"type": "inference.logged", "payload": {}}).encode())
    wrong_type = FakeDelivery(
        event().model_dump_json().replace("inference.logged", "labels.saved").encode()
    )
    good = [delivery(event()) for _ in range(2)]

    for d in [not_json, good[0], wrong_shape, wrong_type, good[1]]:
        await h.worker.deliver(d)

    assert [d.rejects for d in (not_json, wrong_shape, wrong_type)] == [[False]] * 3
    await until(lambda: all(d.acks == 1 for d in good), "good messages acknowledged")
    assert len(h.storage.event_ids()) == 2
    assert h.metric("messages_rejected_total") == 3
    assert not_json.acks == wrong_shape.acks == 0


# --- S3 failures --------------------------------------------------------------------------------


async def test_a_failed_write_is_retried_and_acknowledged_only_once_it_lands(make: Any) -> None:
    h = make(batch_size=2)
    h.storage.down = True
    deliveries = [delivery(event("line-a")), delivery(event("line-b"))]

    for d in deliveries:
        await h.worker.deliver(d)
    await until(lambda: h.metric("write_failures_total") >= 3, "several failed attempts")

    assert [d.acks for d in deliveries] == [0, 0]
    assert h.worker.pending == 2
    with pytest.raises(DependencyUnavailableError, match="fails"):
        await h.worker.check()

    h.storage.down = False
    await until(lambda: all(d.acks == 1 for d in deliveries), "acknowledged after recovery")
    assert len(h.storage.objects) == 2
    assert len(h.storage.event_ids()) == 2
    assert h.worker.pending == 0
    await h.worker.check()


async def test_writing_the_same_batch_again_overwrites_its_own_files() -> None:
    storage = FakeStorage()
    writer = ParquetBatchWriter(storage, BUCKET)
    events = [event("line-a"), event("line-b"), event("line-a", "2026-01-01T23:59:00Z")]

    first = await writer.write(events)
    again = await writer.write(list(reversed(events)))

    assert first.keys == again.keys
    assert first.batch_id == again.batch_id
    assert storage.content_types == {"application/vnd.apache.parquet"}
    assert storage.metadata == [{"batch-id": first.batch_id}] * 6
    assert storage.puts == 6
    assert len(storage.objects) == 3
    assert sorted(storage.event_ids()) == sorted(str(e.event_id) for e in events)


# --- stop ---------------------------------------------------------------------------------------


async def test_stop_writes_the_partial_batch(make: Any) -> None:
    h = make(batch_size=100, max_wait_s=3600)
    deliveries = [delivery(event()) for _ in range(3)]
    for d in deliveries:
        await h.worker.deliver(d)

    await h.worker.stop(5.0)

    assert [d.acks for d in deliveries] == [1, 1, 1]
    assert len(h.storage.event_ids()) == 3
    with pytest.raises(DependencyUnavailableError, match="not running"):
        await h.worker.check()


async def test_stop_gives_up_on_a_dead_s3_and_leaves_the_batch_unacknowledged(make: Any) -> None:
    h = make(batch_size=100, max_wait_s=3600)
    h.storage.down = True
    deliveries = [delivery(event()) for _ in range(3)]
    for d in deliveries:
        await h.worker.deliver(d)

    await h.worker.stop(0.2)

    assert [d.acks for d in deliveries] == [0, 0, 0]
    assert h.storage.objects == {}
    assert h.worker.pending == 3
