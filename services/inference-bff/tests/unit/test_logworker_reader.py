import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from flywheel_contracts import InferenceLoggedV1
from flywheel_inference_bff.logworker.layout import SCHEMA, Partition, encode, to_table
from flywheel_inference_bff.logworker.reader import read_inference_logs

BUCKET = "logs"


def event(model_line: str, served_at: str) -> InferenceLoggedV1:
    return InferenceLoggedV1.model_validate(
        {
            "payload": InferenceLoggedV1.EXAMPLE
            | {"model_line": model_line, "request_id": uuid.uuid4(), "served_at": served_at}
        }
    )


@dataclass
class FakeObjects:
    objects: dict[str, bytes] = field(default_factory=dict)
    listed: list[str] = field(default_factory=list)
    fetched: list[str] = field(default_factory=list)

    def store(self, name: str, *events: InferenceLoggedV1) -> None:
        first = events[0].payload
        hour = first.served_at.replace(minute=0, second=0, microsecond=0)
        self.objects[Partition(first.model_line, hour).key(name)] = encode(to_table(events))

    async def list_keys(self, bucket: str, prefix: str) -> list[str]:
        assert bucket == BUCKET
        self.listed.append(prefix)
        return [k for k in self.objects if k.startswith(prefix)]

    async def get(self, bucket: str, key: str) -> bytes:
        assert bucket == BUCKET
        self.fetched.append(key)
        return self.objects[key]


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


async def test_reads_only_the_partitions_of_the_range_and_each_event_once() -> None:
    objects = FakeObjects()
    early = event("line-a", "2026-01-01T09:59:00Z")
    inside = [event("line-a", "2026-01-01T10:15:00Z"), event("line-a", "2026-01-01T10:45:00Z")]
    late = event("line-a", "2026-01-02T00:10:00Z")
    other_line = event("line-b", "2026-01-01T10:15:00Z")
    objects.store("batch-1", early)
    objects.store("batch-2", *inside)
    # The same event redelivered in another batch composition.
    objects.store("batch-3", inside[1])
    objects.store("batch-4", late)
    objects.store("batch-5", other_line)

    table = await read_inference_logs(
        objects,
        BUCKET,
        model_line="line-a",
        since=utc("2026-01-01T10:00:00"),
        until=utc("2026-01-01T11:00:00"),
    )

    assert table.schema == SCHEMA
    assert table.column("event_id").to_pylist() == [str(e.event_id) for e in inside]
    assert objects.listed == ["inference/model_line=line-a/date=2026-01-01/"]
    assert all("hour=10" in key for key in objects.fetched)


async def test_rows_outside_the_range_inside_a_partition_are_left_out() -> None:
    objects = FakeObjects()
    before, within = event("l", "2026-01-01T10:10:00Z"), event("l", "2026-01-01T10:20:00Z")
    objects.store("b", before, within)

    table = await read_inference_logs(
        objects,
        BUCKET,
        model_line="l",
        since=datetime(2026, 1, 1, 10, 15),
        until=utc("2026-01-01T10:20:00.000001"),
    )

    assert table.column("event_id").to_pylist() == [str(within.event_id)]


async def test_a_range_over_midnight_lists_each_day_once() -> None:
    objects = FakeObjects()
    objects.store("b1", event("l", "2026-01-01T23:30:00Z"))
    objects.store("b2", event("l", "2026-01-02T00:30:00Z"))

    table = await read_inference_logs(
        objects,
        BUCKET,
        model_line="l",
        since=utc("2026-01-01T23:00:00"),
        until=utc("2026-01-02T01:00:00"),
    )

    assert table.num_rows == 2
    assert objects.listed == [
        "inference/model_line=l/date=2026-01-01/",
        "inference/model_line=l/date=2026-01-02/",
    ]


async def test_nothing_stored_or_an_empty_range_reads_as_an_empty_table() -> None:
    objects = FakeObjects()

    none_stored = await read_inference_logs(
        objects,
        BUCKET,
        model_line="l",
        since=utc("2026-01-01T00:00:00"),
        until=utc("2026-01-01T05:00:00"),
    )
    backwards = await read_inference_logs(
        objects,
        BUCKET,
        model_line="l",
        since=utc("2026-01-02T00:00:00"),
        until=utc("2026-01-01T00:00:00"),
    )

    assert none_stored.num_rows == backwards.num_rows == 0
    assert none_stored.schema == SCHEMA
    assert objects.listed == ["inference/model_line=l/date=2026-01-01/"]
