import functools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from faststream.rabbit import RabbitBroker, RabbitQueue, TestRabbitBroker

from flywheel_contracts import (
    CanaryVerdictV1,
    Event,
    InferenceLoggedV1,
    ProjectConfiguredV1,
    RolloutStepV1,
)
from flywheel_inference_bff.adapters.inference_log import BufferedInferenceLog
from flywheel_inference_bff.handlers import register
from flywheel_inference_bff.inputs import ImageBytes
from flywheel_inference_bff.service import Prediction, PredictOptions
from flywheel_runtime.messaging import create_broker, publish_event
from flywheel_runtime.topology import Topology
from flywheel_testing.wait import wait_for

from ..conftest import digit_image
from ..fakes import MODEL, World, world

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@dataclass
class Harness:
    broker: RabbitBroker
    topology: Topology
    replicas: list[World]
    logged: list[InferenceLoggedV1] = field(default_factory=list)

    async def publish(self, event: Event[Any]) -> None:
        await publish_event(self.broker, self.topology, event)


def step(percent: int, *, at: datetime = T0, sequence: int = 1) -> RolloutStepV1:
    return RolloutStepV1.model_validate(
        {
            "occurred_at": at,
            "payload": {
                "rollout_id": uuid.UUID(int=3),
                "project_id": "digits",
                "model_line": MODEL,
                "registered_model": MODEL,
                "candidate_version": "2",
                "champion_version": "1",
                "step": 1,
                "traffic_percent": percent,
                "previous_percent": 0,
                "sequence": sequence,
            },
        }
    )


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    broker = create_broker("amqp://guest:guest@localhost:5672/", app_id="inference-bff")
    topology = Topology(namespace="component.")
    replicas = [world(), world()]
    for index, replica in enumerate(replicas):
        register(broker, topology, replica.routing, f"replica-{index}")
    built = Harness(broker, topology, replicas)

    @broker.subscriber(
        RabbitQueue("component.probe", routing_key=InferenceLoggedV1.routing_key()),
        topology.inference_exchange,
    )
    async def probe(event: InferenceLoggedV1) -> None:
        built.logged.append(event)

    async with TestRabbitBroker(broker) as test_broker:
        built.broker = test_broker
        yield built


async def test_every_replica_applies_a_rollout_step(harness: Harness) -> None:
    await harness.publish(step(10))

    for replica in harness.replicas:
        route = replica.routing.route(MODEL)
        assert route is not None
        assert (route.candidate_version, route.candidate_percent) == ("2", 10)
        assert replica.routes.routes[MODEL] == route


async def test_a_stale_step_is_ignored_and_a_verdict_ends_the_canary(harness: Harness) -> None:
    await harness.publish(step(50, sequence=2))
    await harness.publish(step(10, sequence=1))  # delivered late
    first = harness.replicas[0].routing.route(MODEL)
    await harness.publish(
        CanaryVerdictV1.model_validate(
            {
                "occurred_at": T0 + timedelta(minutes=5),
                "payload": {
                    "rollout_id": uuid.UUID(int=3),
                    "project_id": "digits",
                    "model_line": MODEL,
                    "registered_model": MODEL,
                    "candidate_version": "2",
                    "champion_version": "1",
                    "verdict": "promoted",
                },
            }
        )
    )

    assert first is not None
    assert first.candidate_percent == 50
    promoted = harness.replicas[1].routing.route(MODEL)
    assert promoted is not None
    assert (promoted.champion_version, promoted.candidate_version) == ("2", None)


async def test_project_configured_names_the_project_in_later_logs(harness: Harness) -> None:
    await harness.publish(
        ProjectConfiguredV1.model_validate(
            {
                "payload": {
                    "project_id": "handwriting",
                    "model_line": MODEL,
                    "task_type": "classification",
                    "class_names": ["0", "1"],
                    "policy": {},
                    "revision": 2,
                }
            }
        )
    )

    assert harness.replicas[0].routing.project_for(MODEL) == "handwriting"


async def test_predictions_are_published_as_inference_logged(harness: Harness) -> None:
    replica = harness.replicas[0]
    replica.serve("1", champion=True)
    inference_log = BufferedInferenceLog(
        functools.partial(publish_event, harness.broker, harness.topology), replica.metrics
    )
    replica.predictor._log = inference_log
    inference_log.start()

    outcomes = await replica.predictor.predict_many(
        [ImageBytes(digit_image(i), "image") for i in range(3)], PredictOptions(MODEL, 1)
    )

    async def all_logged() -> bool:
        return len(harness.logged) == 3

    await wait_for(all_logged, message="3 inference.logged")
    await inference_log.stop()
    ids = {o.prediction_id for o in outcomes if isinstance(o, Prediction)}
    assert {e.payload.request_id for e in harness.logged} == ids
