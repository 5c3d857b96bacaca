import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from faststream.rabbit import RabbitBroker, TestRabbitBroker

from flywheel_contracts import (
    Event,
    InferenceLoggedV1,
    LabelsSavedV1,
    ModelValidatedV1,
    RolloutStepV1,
    TrainingFailedV1,
)
from flywheel_rollout.api import router
from flywheel_rollout.handlers import register
from flywheel_rollout.ports import CanaryState
from flywheel_runtime.auth import AuthSettings, TokenVerifier, generate_dev_key, issue_dev_token
from flywheel_runtime.http import install_error_handlers
from flywheel_runtime.messaging import create_broker
from flywheel_runtime.topology import Topology

from ..fakes import LINE, POLICY, Harness, harness, labels, logged, threshold, trained, validated


@dataclass
class Wired:
    h: Harness
    broker: RabbitBroker
    topology: Topology

    async def publish(self, event: Event[Any] | dict[str, Any], kind: type[Event[Any]]) -> None:
        body = event if isinstance(event, dict) else event.model_dump(mode="json")
        await self.broker.publish(
            body, exchange=self.topology.exchange_for(kind), routing_key=kind.routing_key()
        )

    def client(self, app: FastAPI | None = None) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app or api_app(self.h))
        return httpx.AsyncClient(transport=transport, base_url="http://test")


def api_app(h: Harness, verifier: TokenVerifier | None = None) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.rollout = h.rollout
    if verifier is not None:
        app.state.token_verifier = verifier
    return app


@pytest.fixture
async def wired() -> AsyncIterator[Wired]:
    h = harness()
    broker = create_broker("amqp://guest:guest@localhost:5672/", app_id="rollout")
    topology = Topology(namespace="component.")
    register(broker, topology, h.rollout)
    async with TestRabbitBroker(broker) as test_broker:
        yield Wired(h, test_broker, topology)


# --- subscriptions ------------------------------------------------------------------------------


async def test_model_validated_on_the_bus_queues_a_canary_that_the_tick_starts(
    wired: Wired,
) -> None:
    wired.h.registry.aliases["champion"] = "1"

    await wired.publish(validated("2", champion="1"), ModelValidatedV1)
    await wired.h.settle()

    canary = wired.h.store.only("2")
    assert canary.state is CanaryState.RUNNING
    assert [e.payload.traffic_percent for e in wired.h.store.events(RolloutStepV1)] == [10]


async def test_inference_logs_arrive_on_their_own_exchange_and_fill_the_window(
    wired: Wired,
) -> None:
    wired.h.registry.aliases["champion"] = "1"
    await wired.publish(validated("2", champion="1"), ModelValidatedV1)
    await wired.h.settle()

    for index in range(3):
        await wired.publish(logged("2", index=index, latency_ms=12), InferenceLoggedV1)
    await wired.publish(logged("1", index=0, predicted_class="7"), InferenceLoggedV1)

    windows = wired.h.store.state.windows
    candidate = next(w for (_, _, version), w in windows.items() if version == "2")
    champion = next(w for (_, _, version), w in windows.items() if version == "1")
    assert candidate.requests == 3
    assert champion.requests == 1
    assert champion.agreements == 1  # input 0 answered "7" by both
    assert wired.topology.inference_exchange.name == "component.flywheel.inference"


async def test_labels_feedback_counts_for_the_versions_in_canary(wired: Wired) -> None:
    wired.h.registry.aliases["champion"] = "1"
    await wired.publish(validated("2", champion="1"), ModelValidatedV1)
    await wired.h.settle()

    saved = labels([("2", True), ("2", False), ("1", False), ("5", True)])
    await wired.publish(saved, LabelsSavedV1)

    windows = wired.h.store.state.windows
    assert {version: (w.prefilled, w.corrected) for (_, _, version), w in windows.items()} == {
        "2": (2, 1),
        "1": (1, 0),
    }


async def test_the_loop_events_upstream_land_on_the_timeline(wired: Wired) -> None:
    chain = uuid.uuid4()
    for event in (threshold(chain), trained("3", chain)):
        await wired.publish(event, type(event))
    failed = {
        "correlation_id": str(chain),
        "type": "training.failed",
        "payload": {
            "project_id": "digits",
            "model_line": LINE,
            "snapshot_id": "snap-1",
            "training_run_id": str(uuid.uuid4()),
            "backend": "local",
            "reason": "worker exited with 137",
        },
    }
    await wired.publish(failed, TrainingFailedV1)

    entries = await wired.h.rollout.timeline(LINE, chain, 10)
    assert [e.kind for e in entries] == ["threshold.reached", "model.trained", "training.failed"]
    assert entries[2].summary.endswith("failed: worker exited with 137")


async def test_a_malformed_event_never_reaches_the_rollout(wired: Wired) -> None:
    await wired.publish(
        {"type": "model.validated", "payload": {"project_id": "digits"}}, ModelValidatedV1
    )

    assert wired.h.store.state.claimed == set()
    assert wired.h.store.state.canaries == {}


async def test_the_same_event_twice_gives_one_canary(wired: Wired) -> None:
    event = validated("2", champion="1")

    await wired.publish(event, ModelValidatedV1)
    await wired.publish(event, ModelValidatedV1)

    assert len(wired.h.store.state.canaries) == 1


# --- operator API -------------------------------------------------------------------------------


async def test_the_api_reads_canaries_checks_lines_and_timelines(wired: Wired) -> None:
    h = wired.h
    h.registry.aliases["champion"] = "1"
    await wired.publish(validated("2", champion="1"), ModelValidatedV1)
    await h.settle()
    await h.serve("2", 30)
    await h.serve("1", 60)
    await h.later(POLICY.interval_s)
    rollout_id = h.store.only("2").rollout_id

    async with wired.client() as client:
        current = await client.get(f"/api/v1/lines/{LINE}/canary")
        one = await client.get(f"/api/v1/canaries/{rollout_id}")
        listed = await client.get("/api/v1/canaries", params={"model_line": LINE})
        by_state = await client.get("/api/v1/canaries", params={"state": ["promoted"]})
        checks = await client.get(f"/api/v1/canaries/{rollout_id}/checks")
        line = await client.get(f"/api/v1/lines/{LINE}")
        timeline = await client.get(f"/api/v1/lines/{LINE}/timeline", params={"limit": 3})
        unknown = await client.get(f"/api/v1/canaries/{uuid.uuid4()}")
        none_running = await client.get("/api/v1/lines/other-line/canary")
        bad_line = await client.get("/api/v1/lines/Not_A_Slug/timeline")

    assert current.status_code == 200
    assert current.json()["traffic_percent"] == 50
    assert one.json()["policy"]["steps"] == [10, 50]
    assert [c["candidate_version"] for c in listed.json()["canaries"]] == ["2"]
    assert by_state.json() == {"canaries": []}
    [check] = checks.json()["checks"]
    assert check["status"] == "passed"
    assert check["candidate"]["requests"] == 30
    assert check["champion"]["requests"] == 60
    assert check["results"][0]["name"] == "error_rate"
    assert line.json()["control"]["frozen"] is False
    assert line.json()["current"]["candidate_version"] == "2"
    assert [e["kind"] for e in timeline.json()["entries"]] == [
        "rollout.step",
        "check",
        "rollout.step",
    ]
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "canary_not_found"
    assert none_running.status_code == 404
    assert bad_line.status_code == 422


async def test_the_api_runs_operator_actions_and_answers_409_when_they_do_not_fit(
    wired: Wired,
) -> None:
    h = wired.h
    h.registry.aliases["champion"] = "1"
    await wired.publish(validated("2", champion="1"), ModelValidatedV1)
    await h.settle()

    async with wired.client() as client:
        paused = await client.post(f"/api/v1/lines/{LINE}/pause", json={"reason": "look"})
        again = await client.post(f"/api/v1/lines/{LINE}/pause")
        resumed = await client.post(f"/api/v1/lines/{LINE}/resume")
        frozen = await client.post(f"/api/v1/lines/{LINE}/freeze", json={"reason": "incident"})
        rolled = await client.post(f"/api/v1/lines/{LINE}/rollback")
        nothing = await client.post(f"/api/v1/lines/{LINE}/promote")
        unfrozen = await client.post(f"/api/v1/lines/{LINE}/unfreeze")
        extra = await client.post(f"/api/v1/lines/{LINE}/pause", json={"why": "x"})

    assert paused.status_code == 200
    assert paused.json()["state"] == "paused"
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "canary_state_conflict"
    assert resumed.json()["state"] == "running"
    assert (frozen.json()["frozen"], frozen.json()["changed_by"]) == (True, "anonymous")
    assert frozen.json()["reason"] == "incident"
    assert rolled.json()["state"] == "rolled_back"
    assert nothing.status_code == 404
    assert unfrozen.json()["frozen"] is False
    assert extra.status_code == 422


async def test_with_auth_reading_needs_a_token_and_acting_the_operator_role(
    wired: Wired,
) -> None:
    h = wired.h
    h.registry.aliases["champion"] = "1"
    await wired.publish(validated("2", champion="1"), ModelValidatedV1)
    await h.settle()
    key = generate_dev_key()
    verifier = TokenVerifier(AuthSettings(dev_signing_key=key))
    app = api_app(h, verifier)
    viewer = {"Authorization": f"Bearer {issue_dev_token(key, subject='viewer')}"}
    operator = {
        "Authorization": "Bearer "
        + issue_dev_token(key, subject="op-1", username="olga", roles=["operator"])
    }

    async with wired.client(app) as client:
        anonymous = await client.get(f"/api/v1/lines/{LINE}/timeline")
        read = await client.get(f"/api/v1/lines/{LINE}/timeline", headers=viewer)
        forbidden = await client.post(f"/api/v1/lines/{LINE}/rollback", headers=viewer)
        rolled = await client.post(f"/api/v1/lines/{LINE}/rollback", headers=operator)
    await verifier.aclose()

    assert anonymous.status_code == 401
    assert read.status_code == 200
    assert forbidden.status_code == 403
    assert forbidden.json()["error"]["code"] == "forbidden"
    assert rolled.status_code == 200
    assert rolled.json()["decided_by"] == "olga"
    assert rolled.json()["reasons"] == ["rolled back by olga"]
