import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
from rich.console import Console

from flywheel_cli.bus import EventFollower, parse_event
from flywheel_cli.demo import Demo, parse_prediction
from flywheel_cli.settings import CliSettings
from flywheel_cli.state import StackState
from flywheel_contracts import (
    CanaryVerdictV1,
    DataQualityFailedV1,
    Event,
    ModelTrainedV1,
    ModelValidatedV1,
    RolloutStepV1,
    ThresholdReachedV1,
)
from flywheel_contracts.topology import EVENTS_EXCHANGE
from flywheel_runtime.topology import Topology
from flywheel_testing.rabbit import delete_names

CHAIN = uuid.UUID(int=1)


def event(cls: type[Event[Any]], correlation: uuid.UUID = CHAIN, **changes: Any) -> Event[Any]:
    return cls.model_validate({"correlation_id": correlation, "payload": cls.EXAMPLE | changes})


class FakeBus:
    def __init__(self, *events: Event[Any]) -> None:
        self.events = list(events)

    async def next(self, _timeout_s: float) -> Event[Any] | None:
        return self.events.pop(0) if self.events else None


def demo_with(*events: Event[Any]) -> Demo:
    demo = Demo(
        CliSettings(base_dir=Path("unused")),
        StackState(),
        Console(record=True, width=200),
        "normal",
    )
    demo._bus = FakeBus(*events)  # type: ignore[assignment]
    demo.started_at = datetime(2000, 1, 1, tzinfo=UTC)
    return demo


def test_a_prediction_becomes_the_prefill_a_labeler_answers() -> None:
    prefill = parse_prediction(
        {
            "prediction_id": "9b2c",
            "model_line": "digits-classifier",
            "model_version": "2",
            "predicted_class": "7",
            "confidence": 0.93,
            "top_k": [{"class_name": "7", "score": 0.93}],
        }
    )

    assert (prefill.prediction_id, prefill.model_version, prefill.predicted_class) == (
        "9b2c",
        "2",
        "7",
    )
    assert prefill.confidence == 0.93


async def test_following_a_retrain_to_its_promotion() -> None:
    fired = event(ThresholdReachedV1)
    demo = demo_with(
        event(ModelTrainedV1),
        event(ModelValidatedV1, candidate_metrics={"accuracy": 0.97}),
        event(RolloutStepV1),
        event(CanaryVerdictV1, verdict="promoted", reasons=[]),
    )

    outcome = await demo._follow(fired, timeout_s=30)  # type: ignore[arg-type]

    assert outcome.verdict == "promoted"
    assert outcome.candidate_version == "4"
    assert outcome.validated_accuracy == 0.97
    text = demo.console.export_text()
    assert "model.validated: v4 passed" in text
    assert "rollout.step: v4 10% → 50%" in text


async def test_steps_republished_from_before_the_demo_are_not_shown_again() -> None:
    demo = demo_with(event(RolloutStepV1))
    demo.started_at = datetime.now(UTC)

    await demo._follow(None, timeout_s=0.2)

    assert "rollout.step" not in demo.console.export_text()


async def test_a_failed_validation_names_the_validator_and_its_reasons() -> None:
    demo = demo_with(
        event(ThresholdReachedV1),
        event(ModelTrainedV1),
        event(ModelValidatedV1, verdict="failed", reasons=["accuracy 0.81 < champion 0.90"]),
    )

    outcome = await demo._follow(None, timeout_s=30)

    assert (outcome.verdict, outcome.stopped_by) == ("rejected", "validator")
    assert outcome.reasons == ["accuracy 0.81 < champion 0.90"]


async def test_a_canary_rollback_names_the_canary() -> None:
    demo = demo_with(event(ThresholdReachedV1), event(CanaryVerdictV1))

    outcome = await demo._follow(None, timeout_s=30)

    assert (outcome.verdict, outcome.stopped_by) == ("rolled_back", "canary rollback")
    assert outcome.reasons == ["candidate error rate 4.1% > champion 0.3% + 1%"]


async def test_a_quarantined_batch_ends_the_poisoned_scenario() -> None:
    demo = demo_with(event(DataQualityFailedV1))

    outcome = await demo._follow(None, timeout_s=30)

    assert (outcome.verdict, outcome.stopped_by) == (
        "quarantined",
        "data-monitor quality quarantine",
    )


async def test_other_chains_and_other_projects_are_ignored() -> None:
    other = uuid.UUID(int=2)
    demo = demo_with(
        event(ThresholdReachedV1),
        event(CanaryVerdictV1, correlation=other, verdict="promoted"),
        event(CanaryVerdictV1, project_id="faces", model_line="faces-classifier"),
    )

    outcome = await demo._follow(None, timeout_s=0.2)

    assert outcome.verdict == "timeout"


def test_unknown_or_newer_events_are_skipped_not_fatal() -> None:
    assert parse_event(b"not json") is None
    assert parse_event(json.dumps({"type": "model.exploded", "payload": {}}).encode()) is None
    newer = ModelTrainedV1.example().model_dump(mode="json") | {"schema_version": 2}
    assert parse_event(json.dumps(newer).encode()) is None
    parsed = parse_event(ModelTrainedV1.example().model_dump_json().encode())
    assert isinstance(parsed, ModelTrainedV1)


async def test_the_follower_sees_events_published_on_the_namespace_exchange(
    rabbit_url: str, topology: Topology
) -> None:
    exchange_name = topology.namespace + EVENTS_EXCHANGE
    sent = ModelTrainedV1.example()
    async with EventFollower(rabbit_url, topology.namespace) as follower:
        connection = await aio_pika.connect(rabbit_url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(exchange_name)
            await exchange.publish(
                aio_pika.Message(sent.model_dump_json().encode()), routing_key="model.trained"
            )
        received = await follower.next(timeout_s=30)
    await delete_names(rabbit_url, [], [exchange_name])

    assert received == sent
