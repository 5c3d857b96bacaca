import asyncio
import contextlib
import hashlib
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from faststream.rabbit import RabbitBroker
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import SecretStr
from sqlalchemy import text

from flywheel_clients.registry import LABELS_FILE, ONNX_FILE
from flywheel_contracts import (
    CanaryOutcome,
    CanaryVerdictV1,
    Event,
    InferenceLoggedV1,
    ModelValidatedV1,
    RolloutStepV1,
)
from flywheel_contracts.topology import queue_name
from flywheel_rollout.main import create_app
from flywheel_rollout.policy import CanaryPolicy
from flywheel_rollout.settings import SERVICE, RolloutSettings
from flywheel_runtime.auth import AuthSettings, generate_dev_key, issue_dev_token
from flywheel_runtime.db import Database
from flywheel_runtime.messaging import create_broker, publish_event
from flywheel_runtime.settings import PlatformSettings
from flywheel_runtime.topology import Topology
from flywheel_serving.repository import ServingOptions
from flywheel_serving.triton import TritonControl, TritonServer
from flywheel_testing.events import EventProbe
from flywheel_testing.rabbit import delete_names, queue_depth
from flywheel_testing.serving import digit_model_files
from flywheel_testing.wait import wait_for
from flywheel_vision.export import labels_json

PROJECT = "digits"
PER_INTERVAL = 12
"""Logs published per version and analysis interval; the policy needs 8 to judge."""
SLOW_S = 180
"""Deadline for a whole canary on a busy machine: Triton loads two Python-backend versions."""
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2 * SLOW_S)]

POLICY = CanaryPolicy(
    steps=[10, 50],
    interval_s=2.0,
    bake_s=0,
    min_requests=8,
    threshold=1,
    min_pairs=8,
)


@dataclass(frozen=True)
class Traffic:
    """How a version behaves in the synthetic logs."""

    ok: bool = True
    latency_ms: float = 8.0
    error_code: str | None = None


HEALTHY = Traffic()
BROKEN = Traffic(ok=False, latency_ms=900.0, error_code="model_error")


@dataclass
class World:
    rabbit_url: str
    topology: Topology
    platform: PlatformSettings
    mlflow_uri: str
    triton: TritonServer
    control: TritonControl
    publisher: RabbitBroker
    probe: EventProbe
    db: Database
    schema: str
    model: str = field(default_factory=lambda: f"digits-{uuid.uuid4().hex[:8]}")
    stacks: dict[int, AsyncExitStack] = field(default_factory=dict)
    apps: list[FastAPI] = field(default_factory=list)

    @property
    def line(self) -> str:
        return self.model

    def settings(self, **overrides: Any) -> RolloutSettings:
        values: dict[str, Any] = {
            "platform": self.platform,
            "namespace": self.topology.namespace,
            "db_schema": self.schema,
            "repository_dir": self.triton.repository,
            "serving": ServingOptions(
                flavour="python", max_batch_size=8, preferred_batch_sizes=(8,)
            ),
            "default_policy": POLICY,
            "tick_s": 0.2,
            "drain_s": 0.5,
            "republish_s": 3600,
        }
        return RolloutSettings(**(values | overrides))

    async def start(self, **overrides: Any) -> FastAPI:
        app = create_app(self.settings(**overrides))
        stack = AsyncExitStack()
        await stack.enter_async_context(app.router.lifespan_context(app))
        self.stacks[id(app)] = stack
        self.apps.append(app)
        return app

    async def stop(self, app: FastAPI) -> None:
        await self.stacks.pop(id(app)).aclose()

    async def stop_all(self) -> None:
        for app in list(self.apps):
            if id(app) in self.stacks:
                await self.stop(app)

    # --- the registry -------------------------------------------------------------------------

    def mlflow(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.mlflow_uri, registry_uri=self.mlflow_uri)

    def register(self, seed: int) -> str:
        """A new version of the model: a real ONNX digit classifier, logged as the trainer does."""
        client = self.mlflow()
        if not client.search_registered_models(f"name = '{self.model}'"):
            client.create_registered_model(self.model)
        experiment = client.get_experiment_by_name(self.model)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else client.create_experiment(self.model)
        )
        run = client.create_run(experiment_id)
        files = digit_model_files(self.model, "0", seed)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / ONNX_FILE).write_bytes(files.onnx)
            (Path(tmp) / LABELS_FILE).write_bytes(labels_json(files.labels))
            client.log_artifacts(run.info.run_id, tmp, artifact_path="model")
        client.set_terminated(run.info.run_id)
        version = client.create_model_version(
            self.model, f"{run.info.artifact_uri}/model", run_id=run.info.run_id
        )
        return str(version.version)

    def alias(self, alias: str) -> str | None:
        try:
            return str(self.mlflow().get_model_version_by_alias(self.model, alias).version)
        except MlflowException:
            return None

    def tags(self, version: str) -> dict[str, str]:
        return dict(self.mlflow().get_model_version(self.model, version).tags)

    # --- the bus ------------------------------------------------------------------------------

    def validated(self, version: str, champion: str | None) -> ModelValidatedV1:
        return ModelValidatedV1.model_validate(
            {
                "payload": {
                    "project_id": PROJECT,
                    "model_line": self.line,
                    "registered_model": self.model,
                    "model_version": version,
                    "champion_version": champion,
                    "snapshot_id": "snap-1",
                    "verdict": "passed",
                }
            }
        )

    async def publish(self, *events: Event[Any]) -> None:
        for event in events:
            await publish_event(self.publisher, self.topology, event)

    async def canary_row(self) -> dict[str, Any] | None:
        """The line's canary in progress, read from the database (with or without the app)."""
        async with self.db.transaction() as session:
            row = (
                await session.execute(
                    text(
                        "SELECT state, interval_index, candidate_version, champion_version "
                        "FROM canaries WHERE model_line = :line "
                        "AND state IN ('running', 'paused', 'starting', 'promoting')"
                    ),
                    {"line": self.line},
                )
            ).first()
        return None if row is None else dict(row._mapping)

    async def feed(self, candidate: Traffic, champion: Traffic) -> None:
        """Publish one batch of logs for both versions per analysis interval, until cancelled."""
        fed: set[int] = set()
        while True:

            async def next_interval() -> dict[str, Any] | None:
                row = await self.canary_row()
                if row is None or row["state"] != "running" or row["interval_index"] in fed:
                    return None
                return row

            row = await wait_for(next_interval, timeout=SLOW_S, message="a new interval")
            fed.add(row["interval_index"])
            for version, traffic in (
                (row["candidate_version"], candidate),
                (row["champion_version"], champion),
            ):
                await self.publish(
                    *(
                        self.logged(version, traffic, f"{row['interval_index']}-{index}")
                        for index in range(PER_INTERVAL)
                    )
                )

    def logged(self, version: str, traffic: Traffic, key: str) -> InferenceLoggedV1:
        return InferenceLoggedV1.model_validate(
            {
                "payload": {
                    "request_id": uuid.uuid4(),
                    "project_id": PROJECT,
                    "model_line": self.line,
                    "registered_model": self.model,
                    "model_version": version,
                    "input_sha256": hashlib.sha256(key.encode()).hexdigest(),
                    "predicted_class": "7" if traffic.ok else None,
                    "latency_ms": traffic.latency_ms,
                    "status": "ok" if traffic.ok else "error",
                    "error_code": traffic.error_code,
                    "served_at": "2026-01-01T12:00:00Z",
                }
            }
        )

    async def verdict(self, candidate: Traffic, champion: Traffic) -> CanaryVerdictV1:
        """Feed traffic until the canary's verdict is on the bus."""
        feeder = asyncio.create_task(self.feed(candidate, champion))
        try:
            [verdict] = await self.probe.wait(CanaryVerdictV1, timeout=SLOW_S)
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
        return verdict

    def steps(self) -> list[tuple[int, int]]:
        """``(traffic, sequence)`` of the weight changes seen; republications (caused by the
        step they repeat) left out."""
        seen = self.probe.of(RolloutStepV1)
        ids = {e.event_id for e in seen}
        return [
            (e.payload.traffic_percent, e.payload.sequence)
            for e in seen
            if e.causation_id not in ids
        ]

    # --- the API ------------------------------------------------------------------------------

    def client(self, app: FastAPI | None = None) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app or self.apps[-1])
        return httpx.AsyncClient(transport=transport, base_url="http://test")

    async def served(self, version: str) -> bool:
        return await self.control.model_ready(self.model, version)


@pytest.fixture
async def world(
    rabbit_url: str,
    database_url: str,
    mlflow_tracking_uri: str,
    triton_server: TritonServer,
    topology: Topology,
) -> AsyncIterator[World]:
    platform = PlatformSettings(
        rabbit_url=SecretStr(rabbit_url),
        database_url=SecretStr(database_url),
        mlflow_uri=mlflow_tracking_uri,
        triton_url=triton_server.http_url,
        delivery_limit=topology.delivery_limit,
    )
    schema = f"ro_{uuid.uuid4().hex[:10]}"
    publisher = create_broker(rabbit_url, app_id="test-publisher")
    await publisher.connect()
    probe = EventProbe(rabbit_url, topology, RolloutStepV1, CanaryVerdictV1)
    await probe.start()
    db = Database(database_url, schema)
    async with TritonControl(triton_server.http_url) as control:
        built = World(
            rabbit_url=rabbit_url,
            topology=topology,
            platform=platform,
            mlflow_uri=mlflow_tracking_uri,
            triton=triton_server,
            control=control,
            publisher=publisher,
            probe=probe,
            db=db,
            schema=schema,
        )
        try:
            yield built
        finally:
            await built.stop_all()
            queues = {q for app in built.apps for q in app.state.runtime.topology.queue_names}
            await delete_names(rabbit_url, sorted(queues), [])
            with contextlib.suppress(Exception):
                await control.unload(built.model)
            await db.dispose()
            await probe.stop()
            await publisher.stop()


async def test_a_healthy_candidate_steps_through_10_and_50_percent_to_champion(
    world: World,
) -> None:
    champion, candidate = world.register(seed=1), world.register(seed=2)
    world.mlflow().set_registered_model_alias(world.model, "champion", champion)
    world.mlflow().set_registered_model_alias(world.model, "challenger", candidate)
    await world.start()
    event = world.validated(candidate, champion)

    await world.publish(event)
    verdict = await world.verdict(HEALTHY, HEALTHY)

    assert verdict.payload.verdict is CanaryOutcome.PROMOTED, verdict.payload.reasons
    assert verdict.correlation_id == event.correlation_id
    assert verdict.payload.champion_version == champion
    assert verdict.payload.metrics["candidate_requests"] >= POLICY.min_requests
    assert world.steps() == [(10, 1), (50, 2), (100, 3)]
    assert world.alias("champion") == candidate
    assert world.alias("challenger") is None
    assert world.tags(candidate)["canary.verdict"] == "promoted"
    assert world.tags(champion)["canary.replaced_by"] == candidate

    async def old_champion_unloaded() -> bool:
        return await world.served(candidate) and not await world.served(champion)

    await wait_for(old_champion_unloaded, timeout=SLOW_S, message="the old champion unloaded")
    async with world.client() as client:
        [canary] = (await client.get("/api/v1/canaries", params={"model_line": world.line})).json()[
            "canaries"
        ]
        checks = (await client.get(f"/api/v1/canaries/{canary['rollout_id']}/checks")).json()
    counted = [c for c in checks["checks"] if c["counted"]]
    assert [c["status"] for c in counted] == ["passed", "passed"]
    assert [c["traffic_percent"] for c in counted] == [10, 50]
    assert counted[0]["candidate"]["requests"] >= POLICY.min_requests
    assert counted[0]["metrics"]["agreement"] == 1.0


async def test_a_failing_candidate_is_rolled_back_at_its_first_interval(world: World) -> None:
    champion, candidate = world.register(seed=1), world.register(seed=3)
    world.mlflow().set_registered_model_alias(world.model, "champion", champion)
    world.mlflow().set_registered_model_alias(world.model, "challenger", candidate)
    await world.start()

    await world.publish(world.validated(candidate, champion))
    verdict = await world.verdict(BROKEN, HEALTHY)

    assert verdict.payload.verdict is CanaryOutcome.ROLLED_BACK
    assert verdict.payload.reasons[0] == "1 failed checks reached the threshold"
    assert any(r.startswith("candidate error rate 100.0% >") for r in verdict.payload.reasons)
    assert world.steps() == [(10, 1), (0, 2)]
    assert max(traffic for traffic, _ in world.steps()) == POLICY.steps[0]
    assert world.alias("champion") == champion

    async def tidied() -> bool:
        return world.alias("challenger") is None and not await world.served(candidate)

    await wait_for(tidied, timeout=SLOW_S, message="challenger alias removed, candidate unloaded")
    assert await world.served(champion)
    tags = world.tags(candidate)
    assert tags["canary.verdict"] == "rolled_back"
    assert "candidate error rate" in tags["canary.reasons"]


async def test_a_service_stopped_mid_canary_resumes_and_reaches_the_verdict(
    world: World,
) -> None:
    champion, candidate = world.register(seed=1), world.register(seed=2)
    world.mlflow().set_registered_model_alias(world.model, "champion", champion)
    world.mlflow().set_registered_model_alias(world.model, "challenger", candidate)
    first = await world.start()
    await world.publish(world.validated(candidate, champion))
    feeder = asyncio.create_task(world.feed(HEALTHY, HEALTHY))
    try:

        async def at_fifty() -> bool:
            await world.probe.collect()
            return (50, 2) in world.steps()

        await wait_for(at_fifty, timeout=SLOW_S, message="the 50% step")
        await world.stop(first)
        assert world.steps() == [(10, 1), (50, 2)]
        await world.start(republish_s=0.5)
        verdict = await world.probe.wait(CanaryVerdictV1, timeout=SLOW_S)
    finally:
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeder

    assert verdict[0].payload.verdict is CanaryOutcome.PROMOTED
    assert world.steps() == [(10, 1), (50, 2), (100, 3)]
    assert world.alias("champion") == candidate

    # The restarted service republishes the weights it holds, with their sequence and time,
    # for any BFF that restarted meanwhile.
    async def republished() -> list[RolloutStepV1]:
        await world.probe.collect()
        steps = world.probe.of(RolloutStepV1)
        originals = {e.event_id for e in steps}
        return [e for e in steps if e.causation_id in originals]

    again = await wait_for(republished, timeout=30, message="a republished rollout.step")
    originals = {e.event_id: e for e in world.probe.of(RolloutStepV1)}
    for event in again:
        assert event.payload == originals[event.causation_id].payload
        assert event.occurred_at == originals[event.causation_id].occurred_at


async def test_operator_rollback_and_freeze_over_the_api_land_on_the_timeline(
    world: World,
) -> None:
    key = generate_dev_key()
    operator = {
        "Authorization": "Bearer "
        + issue_dev_token(key, subject="op-1", username="olga", roles=["operator"])
    }
    viewer = {"Authorization": "Bearer " + issue_dev_token(key, subject="viewer")}
    champion, candidate = world.register(seed=1), world.register(seed=2)
    world.mlflow().set_registered_model_alias(world.model, "champion", champion)
    world.mlflow().set_registered_model_alias(world.model, "challenger", candidate)
    app = await world.start(auth=AuthSettings(dev_signing_key=SecretStr(key)))
    event = world.validated(candidate, champion)
    await world.publish(event)
    await world.probe.wait(RolloutStepV1, timeout=SLOW_S)
    line = world.line

    async with world.client(app) as client:
        refused = await client.post(f"/api/v1/lines/{line}/rollback", headers=viewer)
        rolled = await client.post(
            f"/api/v1/lines/{line}/rollback", headers=operator, json={"reason": "complaints"}
        )
        frozen = await client.post(
            f"/api/v1/lines/{line}/freeze", headers=operator, json={"reason": "incident 7"}
        )
        newer = world.register(seed=4)
        await world.publish(world.validated(newer, champion))

        async def refused_recorded() -> list[dict[str, Any]] | None:
            answer = await client.get(f"/api/v1/lines/{line}/timeline", headers=viewer)
            entries: list[dict[str, Any]] = answer.json()["entries"]
            return entries if any(e["kind"] == "canary.refused" for e in entries) else None

        entries = await wait_for(refused_recorded, timeout=60, message="refusal on the timeline")
        chain = await client.get(
            f"/api/v1/lines/{line}/timeline",
            headers=viewer,
            params={"correlation_id": str(event.correlation_id)},
        )

    assert refused.status_code == 403
    assert rolled.status_code == 200
    assert rolled.json()["state"] == "rolled_back"
    assert frozen.json()["frozen"] is True
    kinds = [e["kind"] for e in entries]
    for expected in (
        "model.validated",
        "canary.queued",
        "rollout.step",
        "operator.rollback",
        "canary.verdict",
        "operator.freeze",
        "canary.refused",
    ):
        assert expected in kinds
    assert kinds.index("operator.rollback") < kinds.index("operator.freeze")
    by_kind = {e["kind"]: e for e in entries}
    assert by_kind["operator.rollback"]["actor"] == "olga"
    assert by_kind["operator.rollback"]["summary"] == "rolled back by olga: complaints"
    assert (
        by_kind["canary.refused"]["summary"] == f"model line {line} is frozen by olga: incident 7"
    )
    assert {e["correlation_id"] for e in chain.json()["entries"]} == {str(event.correlation_id)}
    [verdict] = await world.probe.wait(CanaryVerdictV1, timeout=30)
    assert verdict.payload.verdict is CanaryOutcome.ROLLED_BACK
    assert world.steps() == [(10, 1), (0, 2)]


async def test_a_poison_event_is_dead_lettered_and_the_line_keeps_working(world: World) -> None:
    app = await world.start()
    runtime = app.state.runtime
    queue = world.topology.namespace + queue_name(SERVICE, ModelValidatedV1.routing_key())
    dead_letters = runtime.topology.dead_letter_queue(queue).name

    await world.publisher.publish(
        {"type": "model.validated", "payload": {"project_id": "digits"}},
        exchange=world.topology.events_exchange,
        routing_key=ModelValidatedV1.routing_key(),
    )

    async def dead_lettered() -> bool:
        return await queue_depth(world.rabbit_url, dead_letters) == 1

    await wait_for(dead_lettered, timeout=30, message="the poison event in the DLQ")
    async with world.client() as client:
        listed = await client.get("/api/v1/canaries", params={"model_line": world.line})
        ready = await client.get("/readyz")
    assert listed.json() == {"canaries": []}
    assert ready.json()["checks"] == {"broker": "ok", "database": "ok"}
