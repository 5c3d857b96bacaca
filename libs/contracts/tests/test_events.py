import uuid
from typing import Any

import pytest
from pydantic import ValidationError

from flywheel_contracts import (
    ALL_EVENTS,
    Event,
    InferenceLoggedV1,
    LabelsSavedV1,
    ThresholdReachedV1,
)
from flywheel_contracts.envelope import EXAMPLE_EVENT_ID


@pytest.mark.parametrize("cls", ALL_EVENTS, ids=lambda c: c.TYPE)
def test_example_round_trips_through_json(cls: type[Event[Any]]) -> None:
    event = cls.example()

    assert event.type == cls.TYPE
    assert event.schema_version == cls.VERSION
    assert event.event_id == EXAMPLE_EVENT_ID
    assert cls.model_validate_json(event.model_dump_json()) == event


def test_every_event_type_is_unique() -> None:
    routing_keys = [cls.routing_key() for cls in ALL_EVENTS]

    assert len(set(routing_keys)) == len(routing_keys)


def test_envelope_rejects_another_type() -> None:
    body = LabelsSavedV1.example().model_dump(mode="json")

    with pytest.raises(ValidationError, match=r"expected threshold\.reached v1"):
        ThresholdReachedV1.model_validate(body)


def test_envelope_ignores_unknown_fields_from_newer_producers() -> None:
    body = LabelsSavedV1.example().model_dump(mode="json")
    body["payload"]["added_later"] = "x"
    body["trace_hint"] = 1

    event = LabelsSavedV1.model_validate(body)

    assert event.payload.project_id == "digits"


def test_payload_is_frozen() -> None:
    event = LabelsSavedV1.example()

    with pytest.raises(ValidationError):
        event.payload.project_id = "other"  # type: ignore[misc]


def test_caused_keeps_correlation_and_points_back() -> None:
    saved = LabelsSavedV1.example()
    payload = ThresholdReachedV1.example().payload

    reached = saved.caused(ThresholdReachedV1, payload)

    assert reached.correlation_id == saved.correlation_id
    assert reached.causation_id == saved.event_id
    assert reached.event_id != saved.event_id
    assert isinstance(reached.event_id, uuid.UUID)


def test_project_ids_are_slugs() -> None:
    body = LabelsSavedV1.example().model_dump(mode="json")
    body["payload"]["project_id"] = "Not A Slug!"

    with pytest.raises(ValidationError, match="project_id"):
        LabelsSavedV1.model_validate(body)


def test_an_inference_log_from_a_producer_that_never_marks_unreachable_serving_reads_false() -> (
    None
):
    body = InferenceLoggedV1.example().model_dump(mode="json")
    del body["payload"]["serving_unavailable"]
    body["payload"] |= {"status": "error", "error_code": "inference_unavailable"}

    event = InferenceLoggedV1.model_validate(body)

    # Such a failure is judged against its version, as before the field existed.
    assert event.payload.serving_unavailable is False
