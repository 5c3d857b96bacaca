import hashlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from faststream.rabbit import RabbitBroker, TestRabbitBroker

from flywheel_contracts import LabelsRequestedV1
from flywheel_contracts.datasets import image_key
from flywheel_labeling.handlers import register
from flywheel_labeling.ports import NewProject
from flywheel_labeling.service import LabelRequestQueue, ProjectService
from flywheel_labeling.settings import SERVICE
from flywheel_runtime.messaging import create_broker
from flywheel_runtime.topology import Topology

from ..fakes import FakeImages, FakeStore

DIGITS = [str(d) for d in range(10)]


def _sha(n: int) -> str:
    return hashlib.sha256(f"input-{n}".encode()).hexdigest()


def _requested(*scores: float, project: str = "digits") -> LabelsRequestedV1:
    return LabelsRequestedV1.model_validate(
        {
            "payload": {
                "project_id": project,
                "model_line": f"{project}-classifier",
                "request_id": uuid.uuid4(),
                "reason": "drift",
                "items": [
                    {"input_sha256": _sha(n), "image_key": image_key(_sha(n)), "score": score}
                    for n, score in enumerate(scores)
                ],
            }
        }
    )


@dataclass
class Harness:
    store: FakeStore
    broker: RabbitBroker
    topology: Topology

    async def publish(self, body: LabelsRequestedV1 | dict[str, Any]) -> None:
        message = body if isinstance(body, dict) else body.model_dump(mode="json")
        await self.broker.publish(
            message,
            exchange=self.topology.exchange_for(LabelsRequestedV1),
            routing_key=LabelsRequestedV1.routing_key(),
        )

    def scores(self) -> list[float]:
        return sorted(e.score for e in self.store.state.requests.values())


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    store = FakeStore()
    await ProjectService(store).create(
        NewProject(project_id="digits", name="Digits", class_names=DIGITS)
    )
    broker = create_broker("amqp://guest:guest@localhost:5672/", app_id=SERVICE)
    topology = Topology(namespace="component.")
    register(broker, topology, LabelRequestQueue(store, FakeImages()))
    async with TestRabbitBroker(broker) as test_broker:
        yield Harness(store, test_broker, topology)


def test_the_subscription_is_a_quorum_queue_dead_lettering_after_the_delivery_limit() -> None:
    topology = Topology(namespace="ns.", delivery_limit=3)
    queue = topology.queue(SERVICE, LabelsRequestedV1)

    assert queue.name == "ns.labeling.labels.requested"
    assert queue.routing_key == "labels.requested"
    assert queue.arguments["x-queue-type"] == "quorum"
    assert queue.arguments["x-delivery-limit"] == 3
    assert queue.arguments["x-dead-letter-exchange"] == "ns.flywheel.dlx"
    assert topology.dead_letter_queue(queue.name).name == "ns.labeling.labels.requested.dlq"


async def test_a_labels_requested_fills_the_queue(harness: Harness) -> None:
    event = _requested(0.9, 0.2)

    await harness.publish(event)

    assert harness.scores() == [0.2, 0.9]
    assert harness.store.state.claimed == {event.event_id}


async def test_a_redelivered_labels_requested_changes_nothing(harness: Harness) -> None:
    event = _requested(0.9)
    await harness.publish(event)
    before = dict(harness.store.state.requests)

    await harness.publish(event)

    assert harness.store.state.requests == before


async def test_a_malformed_labels_requested_never_reaches_the_queue(harness: Harness) -> None:
    await harness.publish({"type": "labels.requested", "payload": {"project_id": "digits"}})

    assert harness.store.state.claimed == set()
    assert harness.store.state.requests == {}


async def test_a_labels_requested_the_queue_cannot_hold_changes_nothing(harness: Harness) -> None:
    body = _requested(0.9).model_dump(mode="json")
    body["payload"]["items"][0]["score"] = float("nan")

    await harness.publish(body)

    assert harness.store.state.claimed == set()
    assert harness.store.state.requests == {}
