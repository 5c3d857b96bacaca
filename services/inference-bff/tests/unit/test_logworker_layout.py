import uuid
from datetime import UTC, datetime, timedelta, timezone

import pyarrow as pa
import pytest

from flywheel_contracts import InferenceLoggedV1
from flywheel_contracts.events import ImageStatistics, InferenceLoggedPayload
from flywheel_inference_bff.logworker.layout import (
    ENVELOPE_COLUMNS,
    SCHEMA,
    Partition,
    batch_id,
    conform,
    decode,
    encode,
    group,
    hours_between,
    parse_hour,
    partition_of,
    to_table,
)


def event(
    model_line: str = "digits-classifier", served_at: str = "2026-01-01T12:34:56Z"
) -> InferenceLoggedV1:
    return InferenceLoggedV1.model_validate(
        {
            "payload": InferenceLoggedV1.EXAMPLE
            | {"model_line": model_line, "request_id": uuid.uuid4(), "served_at": served_at}
        }
    )


def test_partition_is_the_utc_hour_of_served_at_whatever_the_producers_offset() -> None:
    local = event(served_at="2026-01-02T01:15:00+02:00")

    assert partition_of(local) == Partition(
        "digits-classifier", datetime(2026, 1, 1, 23, tzinfo=UTC)
    )


def test_a_naive_served_at_counts_as_utc() -> None:
    naive = event(served_at="2026-01-01T05:59:59")

    assert partition_of(naive).hour == datetime(2026, 1, 1, 5, tzinfo=UTC)


def test_keys_are_hive_partitions_by_line_date_and_hour() -> None:
    part = Partition("digits-classifier", datetime(2026, 3, 7, 4, tzinfo=UTC))

    assert part.key("b" * 32) == (
        "inference/model_line=digits-classifier/date=2026-03-07/hour=04/" + "b" * 32 + ".parquet"
    )
    assert parse_hour(part.key("x")) == datetime(2026, 3, 7, 4, tzinfo=UTC)


@pytest.mark.parametrize(
    "key",
    [
        "inference/model_line=a/date=2026-01-01/x.parquet",
        "inference/model_line=a/date=2026-13-01/hour=01/x.parquet",
        "inference/model_line=a/date=2026-01-01/hour=24/x.parquet",
        "elsewhere/readme.txt",
    ],
)
def test_keys_outside_the_layout_have_no_hour(key: str) -> None:
    assert parse_hour(key) is None


def test_grouping_splits_by_line_and_hour_and_keeps_one_copy_of_each_event() -> None:
    a1 = event("line-a", "2026-01-01T10:05:00Z")
    a2 = event("line-a", "2026-01-01T10:59:59Z")
    a3 = event("line-a", "2026-01-01T11:00:00Z")
    b1 = event("line-b", "2026-01-01T10:30:00Z")

    groups = group([a3, b1, a1, a2, a1])

    assert {
        (p.model_line, p.hour.hour): [e.event_id for e in rows] for p, rows in groups.items()
    } == {
        ("line-a", 10): [a1.event_id, a2.event_id],
        ("line-a", 11): [a3.event_id],
        ("line-b", 10): [b1.event_id],
    }
    assert list(groups) == sorted(groups)


def test_batch_id_depends_on_the_events_not_their_order_or_repeats() -> None:
    ids = [uuid.uuid4() for _ in range(5)]

    assert batch_id(ids) == batch_id(reversed(ids)) == batch_id([*ids, ids[0]])
    assert batch_id(ids) != batch_id(ids[:4])
    assert len(batch_id(ids)) == 32


def test_hours_between_covers_every_hour_the_range_touches() -> None:
    since = datetime(2026, 1, 1, 22, 30, tzinfo=UTC)
    until = datetime(2026, 1, 2, 1, 0, tzinfo=UTC)

    assert [h.hour for h in hours_between(since, until)] == [22, 23, 0]
    assert list(hours_between(until, since)) == []


def test_schema_holds_every_payload_field_and_the_envelope_ids() -> None:
    # Image statistics are flattened into a column each.
    flattened = set(ImageStatistics.model_fields)
    expected = {*ENVELOPE_COLUMNS, *InferenceLoggedPayload.model_fields, *flattened}
    expected.discard("image_stats")

    assert set(SCHEMA.names) == expected
    assert SCHEMA.field("served_at").type == pa.timestamp("us", tz="UTC")
    assert SCHEMA.field("confidence").type == pa.float64()


def test_rows_survive_parquet_with_the_fixed_schema_even_when_all_optionals_are_null() -> None:
    errored = InferenceLoggedV1.model_validate(
        {
            "causation_id": uuid.uuid4(),
            "payload": InferenceLoggedV1.EXAMPLE
            | {"predicted_class": None, "confidence": None, "status": "error", "error_code": "x"},
        }
    )
    offset = timezone(timedelta(hours=-5))
    errored_late = errored.model_copy(
        update={"occurred_at": datetime(2026, 1, 1, 7, tzinfo=offset)}
    )

    table = decode(encode(to_table([errored_late])))

    assert table.schema == SCHEMA
    [row] = table.to_pylist()
    assert row["event_id"] == str(errored.event_id)
    assert row["causation_id"] == str(errored.causation_id)
    assert row["occurred_at"] == datetime(2026, 1, 1, 12, tzinfo=UTC)
    assert row["confidence"] is None
    assert row["predicted_class"] is None
    assert row["error_code"] == "x"
    assert row["request_id"] == InferenceLoggedV1.EXAMPLE["request_id"]


def test_drift_features_are_stored_with_the_log() -> None:
    logged = InferenceLoggedV1.model_validate(
        {
            "payload": InferenceLoggedV1.EXAMPLE
            | {
                "embedding": [0.25, -1.5, 3.0],
                "image_stats": {"brightness": 0.2, "contrast": 0.3, "width": 28, "height": 32},
                "input_key": "images/9f/" + "9" * 64,
            }
        }
    )

    [row] = decode(encode(to_table([logged, event()]))).to_pylist()[:1]

    assert row["embedding"] == [0.25, -1.5, 3.0]
    assert (row["brightness"], row["contrast"], row["width"], row["height"]) == (0.2, 0.3, 28, 32)
    assert row["input_key"] == "images/9f/" + "9" * 64


def test_conform_fills_columns_an_older_file_lacks_and_drops_unknown_ones() -> None:
    full = to_table([event()])
    older = full.drop_columns(["error_code", "causation_id"]).append_column(
        "legacy", pa.array(["x"])
    )

    table = conform(older)

    assert table.schema == SCHEMA
    assert table.column("error_code").to_pylist() == [None]
    assert table.column("event_id").to_pylist() == full.column("event_id").to_pylist()
