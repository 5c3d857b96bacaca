import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from faststream.rabbit import TestRabbitBroker

from flywheel_clients.kubernetes import KubeConnection, KubeObjects
from flywheel_clients.kubernetes_kserve import (
    INFERENCE_SERVICE,
    MODEL_VERSION,
    PREVIOUS_STORAGE_URI,
    inference_service,
)
from flywheel_contracts import RolloutStepV1
from flywheel_rollout.adapters.kserve import KServeServing, register_steps
from flywheel_rollout.main import create_app
from flywheel_rollout.ports import CanaryState
from flywheel_rollout.service import Rollout
from flywheel_rollout.settings import KServeSettings, RolloutSettings
from flywheel_runtime.errors import DependencyUnavailableError, InvalidInputError
from flywheel_runtime.messaging import create_broker
from flywheel_runtime.topology import Topology
from flywheel_testing.kube import CrdSchema, load_crd_schemas, validate_manifest
from flywheel_testing.kubeapi import KubeApiServer

from ..fakes import (
    LINE,
    MODEL,
    POLICY,
    Clock,
    FakeBus,
    FakeRegistry,
    FakeServing,
    FakeStore,
    Harness,
    validated,
)

NAMESPACE = "serving"
PATH = INFERENCE_SERVICE.path(NAMESPACE, MODEL)
V1 = f"s3://flywheel-models/kserve/{MODEL}/1/"
V2 = f"s3://flywheel-models/kserve/{MODEL}/2/"


@pytest.fixture(scope="module")
def crds() -> dict[tuple[str, str], CrdSchema]:
    try:
        return load_crd_schemas()
    except FileNotFoundError as error:
        pytest.skip(f"CRD checks skipped: {error}")


def kserve_settings(kube_api: KubeApiServer, **overrides: Any) -> KServeSettings:
    return KServeSettings.model_validate(
        {
            "connection": KubeConnection(host=kube_api.url),
            "namespace": NAMESPACE,
            "runtime": "kserve-tritonserver",
            "service_account": "flywheel-serving",
            "readiness_timeout_s": 30.0,
            "poll_s": 0.01,
        }
        | overrides
    )


@dataclass
class FakeKServe:
    """Plays KServe's controller on the stand-in API server: a new ``storageUri`` is a new
    revision, ``canaryTrafficPercent`` splits between it and the last rolled-out one."""

    kube_api: KubeApiServer
    ready: bool = True
    uris: dict[str, str] = field(default_factory=dict)
    rolled_out: str | None = None

    def reconcile(self) -> None:
        obj = self.kube_api.get(PATH)
        if obj is None:
            return
        generation = obj["metadata"]["generation"]
        status = obj.get("status") or {}
        if status.get("observedGeneration") == generation:
            return
        predictor = obj["spec"]["predictor"]
        uri = predictor["model"]["storageUri"]
        latest = next(reversed(self.uris), None)
        if latest is None or self.uris[latest] != uri:
            latest = f"{MODEL}-predictor-{len(self.uris) + 1:05d}"
            self.uris[latest] = uri
        percent = predictor.get("canaryTrafficPercent")
        if self.ready and (percent is None or self.rolled_out is None):
            self.rolled_out = latest
        rolled_out = self.rolled_out or latest
        if rolled_out == latest:
            traffic = [(latest, 100)]
        else:
            traffic = [(latest, percent or 0), (rolled_out, 100 - (percent or 0))]
        self.kube_api.set_status(
            PATH,
            {
                "observedGeneration": generation,
                "conditions": [{"type": "Ready", "status": "True" if self.ready else "False"}]
                + ([] if self.ready else [{"type": "LatestDeploymentReady", "status": "False"}]),
                "components": {
                    "predictor": {
                        "latestCreatedRevision": latest,
                        "latestReadyRevision": latest if self.ready else rolled_out,
                        "latestRolledoutRevision": rolled_out,
                        "traffic": [
                            {"revisionName": r, "percent": p, "latestRevision": r == latest}
                            for r, p in traffic
                        ],
                    }
                },
            },
        )

    async def run(self) -> None:
        while True:
            await asyncio.to_thread(self.reconcile)
            await asyncio.sleep(0.005)


@dataclass
class RecordingRepositories:
    """Records each publish, and that no spec named the URI before its repository was there."""

    kube_api: KubeApiServer
    published: list[tuple[str, str]] = field(default_factory=list)

    async def publish(self, registered_model: str, version: str, storage_uri: str) -> None:
        if (registered_model, version) in self.published:
            return
        named = [
            r for r in self.kube_api.requests if storage_uri in json.dumps(r.body, default=str)
        ]
        assert not named, f"{storage_uri} named before its repository was published"
        self.published.append((registered_model, version))


@dataclass
class Kserved:
    h: Harness
    serving: KServeServing
    kube_api: KubeApiServer
    controller: FakeKServe
    repositories: RecordingRepositories
    relayed: int = 0

    async def settle(self, seconds: float = 0) -> None:
        """Move the clock, tick, and deliver the new rollout.step events as the broker would."""
        await (self.h.later(seconds) if seconds else self.h.settle())
        steps = self.h.store.events(RolloutStepV1)
        for step in steps[self.relayed :]:
            await self.serving.apply_step(step)
        self.relayed = len(steps)

    def predictor_patches(self) -> list[dict[str, Any]]:
        return [r.body["spec"]["predictor"] for r in self.kube_api.requests_to("PATCH", PATH)]

    def stored(self) -> dict[str, Any]:
        obj = self.kube_api.get(PATH)
        assert obj is not None
        return obj


@contextlib.asynccontextmanager
async def kserve_rollout(kube_api: KubeApiServer, **settings: Any) -> AsyncIterator[Kserved]:
    """The rollout on the KServe backend, with KServe's controller played beside it."""
    clock = Clock()
    store, registry, bus = FakeStore(), FakeRegistry(), FakeBus()
    repositories = RecordingRepositories(kube_api)
    serving = KServeServing(
        KubeObjects(KubeConnection(host=kube_api.url)),
        registry,
        kserve_settings(kube_api, **settings),
        champion_alias="champion",
        challenger_alias="challenger",
        repositories=repositories,
    )
    rollout = Rollout(
        store,
        registry,
        serving,
        bus,
        default_policy=POLICY,
        drain_s=5.0,
        live_cache_s=0.0,
        clock=clock,
    )
    controller = FakeKServe(kube_api)
    task = asyncio.create_task(controller.run())
    harness = Harness(rollout, store, registry, FakeServing(), bus, clock)
    try:
        yield Kserved(harness, serving, kube_api, controller, repositories)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await serving.close()


@pytest.fixture
async def kserved(kube_api: KubeApiServer) -> AsyncIterator[Kserved]:
    async with kserve_rollout(kube_api) as k:
        yield k


async def start_canary(k: Kserved) -> None:
    k.h.registry.aliases |= {"champion": "1", "challenger": "2"}
    await k.h.rollout.model_validated(validated("2", champion="1"))
    await k.settle()
    assert k.h.store.only("2").state is CanaryState.RUNNING


async def healthy_interval(k: Kserved) -> None:
    await k.h.serve("2", 30)
    await k.h.serve("1", 60)
    await k.settle(POLICY.interval_s)


def step(percent: int, sequence: int, *, later_s: float = 0) -> RolloutStepV1:
    example = RolloutStepV1.example()
    return example.model_copy(
        update={
            "occurred_at": example.occurred_at + timedelta(seconds=later_s),
            "payload": example.payload.model_copy(
                update={
                    "registered_model": MODEL,
                    "candidate_version": "2",
                    "champion_version": "1",
                    "traffic_percent": percent,
                    "sequence": sequence,
                }
            ),
        }
    )


def serving_champion(kube_api: KubeApiServer, serving: KServeServing) -> FakeKServe:
    """The InferenceService as deployed before: version 1 rolled out and ready."""
    kube_api.put(INFERENCE_SERVICE.path(NAMESPACE), inference_service(serving.spec(MODEL, "1")))
    controller = FakeKServe(kube_api)
    controller.reconcile()
    return controller


# --- the built object ---------------------------------------------------------------------------


def test_the_inference_service_it_builds_passes_the_kserve_crd_schema(
    crds: dict[tuple[str, str], CrdSchema], kube_api: KubeApiServer
) -> None:
    serving = KServeServing(
        KubeObjects(KubeConnection(host=kube_api.url)),
        FakeRegistry(),
        kserve_settings(kube_api, gpus=1),
        champion_alias="champion",
        challenger_alias="challenger",
    )

    spec = serving.spec(MODEL, "1")

    validate_manifest(inference_service(spec), crds=crds)
    validate_manifest(inference_service(spec, canary_percent=10), crds=crds)


async def test_the_inference_service_after_a_canary_step_still_passes_the_crd_schema(
    crds: dict[tuple[str, str], CrdSchema], kserved: Kserved
) -> None:
    await start_canary(kserved)

    stored = kserved.stored()
    metadata = stored["metadata"]
    applied = {
        "apiVersion": stored["apiVersion"],
        "kind": stored["kind"],
        "metadata": {k: metadata[k] for k in ("name", "namespace", "labels", "annotations")},
        "spec": stored["spec"],
    }
    validate_manifest(applied, crds=crds)


def test_names_and_storage_uris_come_from_the_settings(kube_api: KubeApiServer) -> None:
    settings = kserve_settings(
        kube_api,
        services={"digits": "digits-canary"},
        name_template="fw-{registered_model}",
        storage_uri_template="s3://models/triton/{registered_model}/v{version}",
    )
    serving = KServeServing(
        KubeObjects(KubeConnection(host=kube_api.url)),
        FakeRegistry(),
        settings,
        champion_alias="champion",
        challenger_alias="challenger",
    )

    assert serving.service_name("digits") == "digits-canary"
    assert serving.service_name("letters") == "fw-letters"
    assert serving.storage_uri("letters", "7") == "s3://models/triton/letters/v7"


# --- a canary through the service ---------------------------------------------------------------


async def test_a_canary_moves_canary_traffic_percent_10_then_50_then_is_promoted(
    kserved: Kserved,
) -> None:
    await start_canary(kserved)
    [created] = kserved.kube_api.requests_to("POST", INFERENCE_SERVICE.path(NAMESPACE))
    assert created.body["spec"]["predictor"]["model"]["storageUri"] == V1
    assert created.body["metadata"]["annotations"][MODEL_VERSION] == "1"
    assert "canaryTrafficPercent" not in created.body["spec"]["predictor"]

    for _ in range(20):
        if kserved.h.store.only("2").state is CanaryState.PROMOTED:
            break
        await healthy_interval(kserved)
    await kserved.settle(10)

    canary = kserved.h.store.only("2")
    assert canary.state is CanaryState.PROMOTED
    assert canary.finalized_at is not None
    assert kserved.predictor_patches() == [
        {"canaryTrafficPercent": 0, "model": {"storageUri": V2}},
        {"canaryTrafficPercent": 10},
        {"canaryTrafficPercent": 50},
        {"canaryTrafficPercent": None, "model": {"storageUri": V2}},
    ]
    predictor = kserved.stored()["spec"]["predictor"]
    assert predictor["model"]["storageUri"] == V2
    assert "canaryTrafficPercent" not in predictor
    assert PREVIOUS_STORAGE_URI not in kserved.stored()["metadata"]["annotations"]
    assert await kserved.serving.ready(MODEL, "2")
    assert not await kserved.serving.ready(MODEL, "1")
    assert kserved.repositories.published == [(MODEL, "1"), (MODEL, "2")]


async def test_a_rollback_sets_zero_percent_and_restores_the_champions_storage_uri(
    kserved: Kserved,
) -> None:
    await start_canary(kserved)

    await kserved.h.rollout.rollback(LINE, "carol", "labelers complain")
    await kserved.settle()
    await kserved.settle(10)

    canary = kserved.h.store.only("2")
    assert canary.state is CanaryState.ROLLED_BACK
    assert canary.finalized_at is not None
    rollback = kserved.kube_api.requests_to("PATCH", PATH)[-1].body
    assert rollback["spec"]["predictor"] == {
        "canaryTrafficPercent": 0,
        "model": {"storageUri": V1},
    }
    assert rollback["metadata"]["annotations"][MODEL_VERSION] == "1"
    assert [p.get("canaryTrafficPercent") for p in kserved.predictor_patches()] == [0, 10, 0]
    assert kserved.stored()["spec"]["predictor"]["model"]["storageUri"] == V1
    assert await kserved.serving.ready(MODEL, "1")
    # The champion's repository was written when it was first served; nothing more.
    assert kserved.repositories.published == [(MODEL, "1"), (MODEL, "2")]


async def test_a_candidate_kserve_cannot_serve_is_rolled_back_without_traffic(
    kube_api: KubeApiServer,
) -> None:
    async with kserve_rollout(kube_api, readiness_timeout_s=0.5) as k:
        k.h.registry.aliases |= {"champion": "1"}
        await k.serving.serve(MODEL, ["1"])
        k.controller.ready = False

        k.h.registry.aliases |= {"challenger": "2"}
        await k.h.rollout.model_validated(validated("2", champion="1"))
        await k.settle()

        canary = k.h.store.only("2")
        assert canary.state is CanaryState.ROLLED_BACK
        assert "candidate could not be loaded" in canary.reasons[0]
        assert k.h.store.events(RolloutStepV1) == []


# --- the adapter on its own ---------------------------------------------------------------------


async def test_ready_is_false_while_the_status_lags_the_spec(kube_api: KubeApiServer) -> None:
    registry = FakeRegistry(aliases={"champion": "1", "challenger": "2"})
    serving = KServeServing(
        KubeObjects(KubeConnection(host=kube_api.url)),
        registry,
        kserve_settings(kube_api),
        champion_alias="champion",
        challenger_alias="challenger",
    )
    controller = serving_champion(kube_api, serving)
    assert await serving.ready(MODEL, "1")

    await serving.apply_step(step(10, 1))

    assert not await serving.ready(MODEL, "2")  # KServe has not reconciled the new spec
    controller.reconcile()
    assert await serving.ready(MODEL, "2")
    assert await serving.ready(MODEL, "1")
    assert not await serving.ready(MODEL, "3")
    await serving.close()


async def test_an_older_step_arriving_late_changes_nothing(kube_api: KubeApiServer) -> None:
    serving = KServeServing(
        KubeObjects(KubeConnection(host=kube_api.url)),
        FakeRegistry(),
        kserve_settings(kube_api),
        champion_alias="champion",
        challenger_alias="challenger",
    )
    serving_champion(kube_api, serving)

    await serving.apply_step(step(50, 2, later_s=10))
    await serving.apply_step(step(10, 1))
    await serving.apply_step(step(50, 2, later_s=10))  # a republication: already in force

    patches = [r.body["spec"]["predictor"] for r in kube_api.requests_to("PATCH", PATH)]
    assert patches == [{"canaryTrafficPercent": 50, "model": {"storageUri": V2}}]
    await serving.close()


async def test_serving_times_out_as_an_outage_while_kserve_is_still_progressing(
    kube_api: KubeApiServer,
) -> None:
    serving = KServeServing(
        KubeObjects(KubeConnection(host=kube_api.url)),
        FakeRegistry(aliases={"champion": "1"}),
        kserve_settings(kube_api, readiness_timeout_s=0.05),
        champion_alias="champion",
        challenger_alias="challenger",
    )

    with pytest.raises(DependencyUnavailableError):
        await serving.serve(MODEL, ["1"])

    FakeKServe(kube_api, ready=False).reconcile()
    with pytest.raises(InvalidInputError):
        await serving.serve(MODEL, ["1"])
    await serving.close()


# --- wiring -------------------------------------------------------------------------------------


async def test_rollout_step_on_the_bus_patches_the_inference_service(
    kube_api: KubeApiServer,
) -> None:
    serving = KServeServing(
        KubeObjects(KubeConnection(host=kube_api.url)),
        FakeRegistry(),
        kserve_settings(kube_api),
        champion_alias="champion",
        challenger_alias="challenger",
    )
    broker = create_broker("amqp://guest:guest@localhost:5672/", app_id="rollout")
    topology = Topology(namespace="component.")
    register_steps(broker, topology, serving)
    serving_champion(kube_api, serving)

    async with TestRabbitBroker(broker) as test_broker:
        await test_broker.publish(
            step(10, 1).model_dump(mode="json"),
            exchange=topology.exchange_for(RolloutStepV1),
            routing_key=RolloutStepV1.routing_key(),
        )

    predictor = kube_api.get(PATH)
    assert predictor is not None
    assert predictor["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert predictor["spec"]["predictor"]["model"]["storageUri"] == V2
    await serving.close()


def test_the_kserve_backend_is_chosen_by_the_settings(kube_api: KubeApiServer) -> None:
    settings = RolloutSettings(namespace="t.", backend="kserve", kserve=kserve_settings(kube_api))

    app = create_app(settings)

    queues = {s.queue.name for s in app.state.runtime.broker.subscribers}
    assert "t.rollout.rollout.step" in queues
    triton = create_app(RolloutSettings(namespace="t."))
    assert "t.rollout.rollout.step" not in {
        s.queue.name for s in triton.state.runtime.broker.subscribers
    }
