"""The services of the loop, each built by its own create_app, running on the real servers.

``Loop`` holds what one test's services share and starts them in process (``start``) or on a
stack of their own that a test may close mid-way (``run``); ``start_*`` build each service with
small-data, short-interval settings. ``LabelingTool`` plays a labeling tool against the BFF and
labeling: it asks ``/predict`` for MNIST test digits without pause and, for some, posts the
human label back with the prediction it was shown. Every test uses its own model line (and so
its own registered model and Triton model): the session's Triton and MLflow are shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from fastapi import FastAPI
from faststream.rabbit import RabbitBroker
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import SecretStr

from flywheel_clients.registry import LABELS_FILE, ONNX_FILE, ModelRegistry
from flywheel_contracts import (
    CanaryVerdictV1,
    Event,
    ModelTrainedV1,
    ModelValidatedV1,
    RolloutStepV1,
    ThresholdReachedV1,
)
from flywheel_data_monitor.main import create_app as create_data_monitor
from flywheel_data_monitor.settings import DataMonitorSettings
from flywheel_inference_bff.main import create_app as create_bff
from flywheel_inference_bff.settings import BffSettings
from flywheel_labeling.main import create_app as create_labeling
from flywheel_labeling.settings import LabelingSettings
from flywheel_rollout.main import create_app as create_rollout
from flywheel_rollout.policy import CanaryPolicy, Margins
from flywheel_rollout.settings import RolloutSettings
from flywheel_runtime.auth import AuthSettings, generate_dev_key, issue_dev_token
from flywheel_runtime.messaging import create_broker, publish_event
from flywheel_runtime.settings import PlatformSettings
from flywheel_runtime.topology import Topology
from flywheel_serving.repository import ServingOptions, sync_from_registry
from flywheel_serving.triton import TritonControl, TritonServer
from flywheel_testing.events import EventProbe
from flywheel_testing.rabbit import delete_names
from flywheel_testing.s3 import S3Server
from flywheel_testing.serving import digit_model_files
from flywheel_testing.wait import ConditionTimeoutError, close_within
from flywheel_trainer_dispatch.main import create_app as create_trainer_dispatch
from flywheel_trainer_dispatch.settings import TrainerDispatchSettings
from flywheel_validator.gates import Gates
from flywheel_validator.main import create_app as create_validator
from flywheel_validator.settings import ValidatorSettings
from flywheel_vision.data import load_mnist, to_png
from flywheel_vision.export import labels_json
from flywheel_vision.preprocess import INPUT_NAME, OUTPUT_NAME, preprocess

PROJECT = "digits"

SERVING = ServingOptions(flavour="python", max_batch_size=8, preferred_batch_sizes=(8,))
"""The Triton bundled with nvidia-pytriton has no ONNX Runtime backend: Python backend."""

TEARDOWN_S = 60.0
"""Longest the services of one test may take to stop."""

POLICY = CanaryPolicy(
    steps=[10, 50],
    interval_s=1.0,
    bake_s=1.0,
    min_requests=3,
    min_pairs=3,
    threshold=1,
    # A loaded 2-core machine makes latency noisy; a slow version (hundreds of ms) still fails.
    margins=Margins(latency_p95=1.0, latency_p99=2.0, latency_slack_ms=100.0, min_agreement=0.5),
)
"""Canary policy of the e2e tests: one-second intervals, a few requests per check, and the
first failed check rolls back."""

LOOP_EVENTS: tuple[type[Event[Any]], ...] = (
    ThresholdReachedV1,
    ModelTrainedV1,
    ModelValidatedV1,
    RolloutStepV1,
    CanaryVerdictV1,
)
"""What a loop test follows, from the retrain to the canary's verdict (``Loop.bootstrap``)."""

PROMOTING_POLICY = POLICY.model_copy(
    update={
        "threshold": 2,
        "margins": Margins(
            latency_p95=1.0, latency_p99=2.0, latency_slack_ms=100.0, min_agreement=0.0
        ),
    }
)
"""For a candidate that should be promoted over the untrained bootstrap champion: it disagrees
with it on most inputs, and latency noise on a busy machine may fail one check (a second one
would roll back)."""

SMALL_DATA_GATES = Gates(
    min_accuracy=0.3,
    min_macro_f1=0.2,
    min_class_recall=0.0,
    min_test_images=20,
    max_latency_p95_ms=500.0,
)
"""Gates for a model trained for seconds on a few hundred images on a busy machine."""


@dataclass
class Loop:
    """What the services of one test share: servers, names, a signing key, and their lifespans."""

    platform: PlatformSettings
    topology: Topology
    bucket: str
    rabbit_url: str
    key: str = field(default_factory=lambda: generate_dev_key("EC"))
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    stack: AsyncExitStack = field(default_factory=AsyncExitStack)
    apps: list[FastAPI] = field(default_factory=list)
    model_line: str = ""
    """This test's model line, registered model and Triton model (unique: servers are shared)."""
    _publisher: RabbitBroker | None = None

    def __post_init__(self) -> None:
        self.model_line = self.model_line or f"digits-{self.suffix}"

    def schema(self, service: str) -> str:
        return f"{service.replace('-', '_')}_{self.suffix}"

    def bearer(self, subject: str, *roles: str) -> dict[str, str]:
        token = issue_dev_token(self.key, subject=subject, roles=roles)
        return {"Authorization": f"Bearer {token}"}

    def with_mlflow(self, tracking_uri: str) -> None:
        self.platform = self.platform.model_copy(update={"mlflow_uri": tracking_uri})

    async def bootstrap(
        self, tracking_uri: str, triton: TritonServer, *events: type[Event[Any]]
    ) -> tuple[str, EventProbe]:
        """Where a loop test starts: an untrained champion registered in ``tracking_uri``'s
        MLflow and served by ``triton`` (unloaded at the end), and a probe on ``events``."""
        self.with_mlflow(tracking_uri)
        self.stack.push_async_callback(self.unserve, triton)
        champion = self.register(seed=1)
        self.mlflow().set_registered_model_alias(self.model_line, "champion", champion)
        await self.serve(triton, champion)
        probe = await self.stack.enter_async_context(
            EventProbe(self.rabbit_url, self.topology, *events)
        )
        return champion, probe

    async def start(self, app: FastAPI) -> httpx.AsyncClient:
        """Run ``app``'s lifespan until the test ends; a client that calls it in-process."""
        await self.stack.enter_async_context(app.router.lifespan_context(app))
        self.apps.append(app)
        return await self.stack.enter_async_context(
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60
            )
        )

    async def run(self, app: FastAPI) -> Running:
        """Run ``app``'s lifespan on a stack of its own, which the test may close early."""
        stack = AsyncExitStack()
        await stack.enter_async_context(app.router.lifespan_context(app))
        self.apps.append(app)
        client = await stack.enter_async_context(
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60
            )
        )
        self.stack.push_async_callback(stack.aclose)
        return Running(app, client, stack)

    async def publish(self, *events: Event[Any]) -> None:
        """Publish ``events`` as their producers would (a stand-in for a service)."""
        if self._publisher is None:
            self._publisher = create_broker(self.rabbit_url, app_id="e2e-test")
            await self._publisher.connect()
            self.stack.push_async_callback(self._publisher.stop)
        for event in events:
            await publish_event(self._publisher, self.topology, event)

    def validated(self, version: str, champion: str | None) -> ModelValidatedV1:
        """The validator's pass of ``version`` against ``champion``, for versions registered by
        the test (the validator needs a trainer's weights to check export parity)."""
        return ModelValidatedV1.model_validate(
            {
                "payload": {
                    "project_id": PROJECT,
                    "model_line": self.model_line,
                    "registered_model": self.model_line,
                    "model_version": version,
                    "champion_version": champion,
                    "snapshot_id": f"snap-{self.suffix}",
                    "verdict": "passed",
                }
            }
        )

    def serving_platform(self, triton: TritonServer) -> PlatformSettings:
        return self.platform.model_copy(update={"triton_url": triton.http_url})

    # --- the services, with small-data, short-interval settings ---------------------------

    def labeling_settings(self, **overrides: Any) -> LabelingSettings:
        return LabelingSettings(
            platform=self.platform,
            auth=AuthSettings(dev_signing_key=self.key),
            namespace=self.topology.namespace,
            db_schema=self.schema("labeling"),
            data_bucket=self.bucket,
            **overrides,
        )

    async def start_labeling(self) -> httpx.AsyncClient:
        return await self.start(create_labeling(self.labeling_settings()))

    def validator_settings(
        self, gates: Gates = SMALL_DATA_GATES, **overrides: Any
    ) -> ValidatorSettings:
        return ValidatorSettings(
            platform=self.platform,
            namespace=self.topology.namespace,
            db_schema=self.schema("validator"),
            data_bucket=self.bucket,
            default_gates=gates,
            latency_images=20,
            **overrides,
        )

    def trainer_settings(self, runs_dir: Path, **overrides: Any) -> TrainerDispatchSettings:
        values: dict[str, Any] = {
            "platform": self.platform,
            "namespace": self.topology.namespace,
            "db_schema": self.schema("trainer-dispatch"),
            "data_bucket": self.bucket,
            "runs_dir": runs_dir,
            "epochs": 3,
            # The bootstrap champion is an ONNX file only: train from scratch.
            "base_alias": None,
            "poll_interval_s": 0.2,
            "timeout_s": 300,
        }
        return TrainerDispatchSettings(**(values | overrides))

    def data_monitor_settings(self, **overrides: Any) -> DataMonitorSettings:
        return DataMonitorSettings(
            platform=self.platform,
            namespace=self.topology.namespace,
            db_schema=self.schema("data-monitor"),
            data_bucket=self.bucket,
            tick_interval_s=0.2,
            **overrides,
        )

    async def start_training(self, runs_dir: Path, gates: Gates = SMALL_DATA_GATES) -> None:
        """data-monitor, trainer-dispatch and validator: labels in, model.validated out."""
        await self.start(create_validator(self.validator_settings(gates)))
        await self.start(create_trainer_dispatch(self.trainer_settings(runs_dir)))
        await self.start(create_data_monitor(self.data_monitor_settings()))

    def rollout_settings(
        self, triton: TritonServer, policy: CanaryPolicy = POLICY, **overrides: Any
    ) -> RolloutSettings:
        values: dict[str, Any] = {
            "platform": self.serving_platform(triton),
            "namespace": self.topology.namespace,
            "db_schema": self.schema("rollout"),
            "auth": AuthSettings(dev_signing_key=self.key),
            "default_policy": policy,
            "repository_dir": triton.repository,
            "serving": SERVING,
            "tick_s": 0.2,
            "drain_s": 0.5,
            "republish_s": 3600,
        }
        return RolloutSettings(**(values | overrides))

    async def start_rollout(
        self, triton: TritonServer, policy: CanaryPolicy = POLICY, **overrides: Any
    ) -> Running:
        return await self.run(create_rollout(self.rollout_settings(triton, policy, **overrides)))

    def bff_settings(self, triton: TritonServer, **overrides: Any) -> BffSettings:
        return BffSettings(
            platform=self.serving_platform(triton),
            namespace=self.topology.namespace,
            db_schema=self.schema("inference-bff"),
            data_bucket=self.bucket,
            results_bucket=self.bucket,
            default_model_line=self.model_line,
            project_ids={self.model_line: PROJECT},
            auth=AuthSettings(dev_signing_key=self.key),
            champion_cache_s=0.5,
            inference_timeout_s=30,
            **overrides,
        )

    async def start_bff(self, triton: TritonServer) -> Running:
        return await self.run(create_bff(self.bff_settings(triton)))

    # --- the registry and Triton ----------------------------------------------------------

    def mlflow(self) -> MlflowClient:
        uri = self.platform.mlflow_uri
        return MlflowClient(tracking_uri=uri, registry_uri=uri)

    def register(self, seed: int) -> str:
        """A new version of this line's model: a real, untrained ONNX digit classifier (about
        10 % accurate), logged as the trainer logs its models."""
        client = self.mlflow()
        if not client.search_registered_models(f"name = '{self.model_line}'"):
            client.create_registered_model(self.model_line)
        experiment = client.get_experiment_by_name(self.model_line)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else client.create_experiment(self.model_line)
        )
        run = client.create_run(experiment_id)
        files = digit_model_files(self.model_line, "0", seed)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / ONNX_FILE).write_bytes(files.onnx)
            (Path(tmp) / LABELS_FILE).write_bytes(labels_json(files.labels))
            client.log_artifacts(run.info.run_id, tmp, artifact_path="model")
        client.set_terminated(run.info.run_id)
        version = client.create_model_version(
            self.model_line, f"{run.info.artifact_uri}/model", run_id=run.info.run_id
        )
        return str(version.version)

    def alias(self, alias: str) -> str | None:
        try:
            found = self.mlflow().get_model_version_by_alias(self.model_line, alias)
        except MlflowException:
            return None
        return str(found.version)

    async def serve(self, triton: TritonServer, *versions: str) -> None:
        """Load ``versions`` of this line's model into ``triton`` (a champion before any
        canary: rollout loads versions only for the canaries it runs)."""
        await sync_from_registry(
            ModelRegistry(self.platform.mlflow_uri),
            self.model_line,
            triton.repository,
            SERVING,
            versions=list(versions),
        )
        async with TritonControl(triton.http_url) as control:
            await control.load(self.model_line)
            for version in versions:
                await control.wait_model_ready(self.model_line, version, timeout=120)

    async def unserve(self, triton: TritonServer) -> None:
        async with TritonControl(triton.http_url) as control:
            with contextlib.suppress(Exception):
                await control.unload(self.model_line)

    async def accuracy(self, version: str, images: int = 500) -> float:
        """Accuracy of ``version``'s ONNX on a frozen slice of the MNIST test set that no
        test labels or sends to the BFF."""
        files = await ModelRegistry(self.platform.mlflow_uri).download_model_files(
            self.model_line, version
        )
        pixels, classes = load_mnist("test", limit=FROZEN_TEST_END)
        batch = np.stack([preprocess(to_png(p)) for p in pixels[FROZEN_TEST_END - images :]])
        session = ort.InferenceSession(files.onnx, providers=["CPUExecutionProvider"])
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch})
        predicted = [files.labels[i] for i in np.asarray(logits).argmax(axis=1)]
        truth = [str(c) for c in classes[FROZEN_TEST_END - images :]]
        return sum(p == t for p, t in zip(predicted, truth, strict=True)) / images


FROZEN_TEST_END = 10_000
"""The frozen test set is the end of the MNIST test set; the labeling tool uses its start."""


@dataclass
class Running:
    """A service started on a stack of its own: its app, an in-process client, and its stop."""

    app: FastAPI
    client: httpx.AsyncClient
    stack: AsyncExitStack

    async def stop(self) -> None:
        await self.stack.aclose()


@pytest.fixture
async def loop(
    rabbit_url: str,
    database_url: str,
    s3_server: S3Server,
    topology: Topology,
    unique_bucket: str,
) -> AsyncIterator[Loop]:
    platform = PlatformSettings(
        rabbit_url=SecretStr(rabbit_url),
        database_url=SecretStr(database_url),
        s3_endpoint=s3_server.endpoint,
        s3_access_key=SecretStr(s3_server.access_key),
        s3_secret_key=SecretStr(s3_server.secret_key),
        delivery_limit=topology.delivery_limit,
        log_json=False,
    )
    built = Loop(platform, topology, unique_bucket, rabbit_url)
    yield built
    await close_within(built.stack, TEARDOWN_S)
    queues = {q for app in built.apps for q in app.state.runtime.topology.queue_names}
    await delete_names(rabbit_url, sorted(queues), [])


async def create_project(client: httpx.AsyncClient, loop: Loop, count: int) -> None:
    created = await client.post(
        "/v1/projects",
        headers=loop.bearer("ada", "admin"),
        json={
            "project_id": PROJECT,
            "name": "Digits",
            "class_names": [str(d) for d in range(10)],
            "model_line": loop.model_line,
            "policy": {"count": count},
        },
    )
    assert created.status_code == 201, created.text


async def post_mnist(
    client: httpx.AsyncClient,
    loop: Loop,
    count: int,
    clients: int = 32,
    *,
    through_restarts: bool = False,
) -> list[str]:
    """Post the first ``count`` MNIST training digits, one label per request, from ``clients``.

    ``through_restarts``: a request that finds labeling gone is sent again until it answers,
    as a labeling tool would; a label saved before its answer was lost comes back unchanged.
    """
    images, classes = load_mnist("train", limit=count)
    work: asyncio.Queue[int] = asyncio.Queue()
    for index in range(count):
        work.put_nowait(index)

    async def labeler(n: int) -> list[str]:
        headers = loop.bearer(f"labeler-{n}", "labeler")
        label_ids = []
        while not work.empty():
            index = work.get_nowait()
            while True:
                try:
                    response = await client.post(
                        "/v1/projects/digits/labels",
                        headers=headers,
                        files={"image": (f"{index}.png", to_png(images[index]), "image/png")},
                        data={"class_name": str(classes[index])},
                    )
                except httpx.TransportError:
                    if not through_restarts:
                        raise
                    await asyncio.sleep(0.2)
                    continue
                break
            assert response.status_code in ((200, 201) if through_restarts else (201,)), (
                response.text
            )
            label_ids.append(response.json()["label_id"])
        return label_ids

    return [i for ids in await asyncio.gather(*map(labeler, range(clients))) for i in ids]


@dataclass(frozen=True)
class Answer:
    """One ``/predict`` answer the labeling tool got."""

    sent: datetime
    """When the request left: a request sent before a routing change may answer after it."""
    model_version: str
    predicted_class: str
    true_class: str


class LabelingTool:
    """Plays a labeling tool: asks the BFF for pre-fills of MNIST test digits without pause
    (``concurrency`` at a time; each at most once per ``period_s`` when set) and posts every
    ``label_every``-th digit's human label to labeling with the prediction it was shown, so
    corrections reach rollout.

    The digits come from a small pool that repeats, so both versions of a canary answer the
    same inputs (their agreement is measured); the pool is the start of the MNIST test set,
    away from the frozen test set.
    """

    def __init__(
        self,
        loop: Loop,
        bff: httpx.AsyncClient,
        labeling: httpx.AsyncClient | None = None,
        *,
        pool: int = 40,
        concurrency: int = 4,
        label_every: int = 5,
        period_s: float = 0.0,
    ) -> None:
        self._loop = loop
        self._bff = bff
        self._labeling = labeling
        pixels, classes = load_mnist("test", limit=pool)
        self._images = [to_png(p) for p in pixels]
        self._classes = [str(c) for c in classes]
        self._concurrency = concurrency
        self._label_every = label_every
        self._period_s = period_s
        self._predict = loop.bearer("labeling-tool", "predict")
        self._label = loop.bearer("labeler-tool", "labeler")
        self._tasks: list[asyncio.Task[None]] = []
        self._count = 0
        self.answers: list[Answer] = []
        self.failures: Counter[str] = Counter()
        """Refused predictions by error code (a version still loading, say)."""

    async def __aenter__(self) -> LabelingTool:
        self._tasks = [
            asyncio.create_task(self._work(), name=f"labeling-tool-{n}")
            for n in range(self._concurrency)
        ]
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def versions(self, since: datetime | None = None) -> Counter[str]:
        """How many answers each version gave to requests sent since ``since``."""
        return Counter(a.model_version for a in self.answers if since is None or a.sent >= since)

    async def served(self, version: str, n: int = 1, timeout: float = 60) -> None:  # noqa: ASYNC109
        """Wait until ``version`` answered ``n`` more times than it had."""
        wanted = self.versions()[version] + n
        deadline = time.monotonic() + timeout
        while self.versions()[version] < wanted:
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"version {version} did not answer {n} times within {timeout}s: "
                    f"{dict(self.versions())}, failures {dict(self.failures)}"
                )
            await asyncio.sleep(0.05)

    async def _work(self) -> None:
        while True:
            started = time.monotonic()
            index = self._count % len(self._images)
            self._count += 1
            await self._once(index, label=self._count % self._label_every == 0)
            # Pacing, not waiting for a condition: traffic at the rate the test asked for.
            if (rest := self._period_s - (time.monotonic() - started)) > 0:
                await asyncio.sleep(rest)

    async def _once(self, index: int, *, label: bool) -> None:
        image = self._images[index]
        sent = datetime.now(UTC)
        try:
            response = await self._bff.post(
                "/predict",
                files={"image": (f"{index}.png", image, "image/png")},
                data={"model_line": self._loop.model_line},
                headers=self._predict,
            )
        except httpx.TransportError:
            # The BFF restarting: a labeling tool tries again a moment later.
            self.failures["unreachable"] += 1
            await asyncio.sleep(0.2)
            return
        if response.status_code != 200:
            self.failures[response.json().get("error", {}).get("code", "unknown")] += 1
            # A refused prediction (a version loading) is retried by the next loop; no spin.
            await asyncio.sleep(0.05)
            return
        answer = response.json()
        self.answers.append(
            Answer(
                sent=sent,
                model_version=answer["model_version"],
                predicted_class=answer["predicted_class"],
                true_class=self._classes[index],
            )
        )
        if label and self._labeling is not None:
            saved = await self._labeling.post(
                f"/v1/projects/{PROJECT}/labels",
                headers=self._label,
                files={"image": (f"test-{index}.png", image, "image/png")},
                data={
                    "class_name": self._classes[index],
                    "prediction_id": answer["prediction_id"],
                    "model_version": answer["model_version"],
                    "predicted_class": answer["predicted_class"],
                },
            )
            assert saved.status_code in (200, 201), saved.text


def steps_of(events: Sequence[Any]) -> list[tuple[int, int]]:
    """``(traffic_percent, sequence)`` of the weight changes among ``rollout.step`` events, once
    each; republications (caused by the step they repeat) left out."""
    ids = {e.event_id for e in events}
    unique = {e.event_id: e for e in events}.values()  # an outbox may publish twice after a crash
    return [
        (e.payload.traffic_percent, e.payload.sequence) for e in unique if e.causation_id not in ids
    ]


async def verdicts(
    probe: EventProbe,
    rollout: httpx.AsyncClient,
    loop: Loop,
    n: int = 1,
    timeout: float = 120,  # noqa: ASYNC109
) -> list[CanaryVerdictV1]:
    """At least ``n`` ``canary.verdict`` events; on a timeout, the checks of the line's canaries
    say why (too little traffic, a failing metric) in the failure."""
    try:
        return await probe.wait(CanaryVerdictV1, n=n, timeout=timeout)
    except ConditionTimeoutError as error:
        operator = loop.bearer("e2e", "operator")
        listed = await rollout.get(
            "/api/v1/canaries", params={"model_line": loop.model_line}, headers=operator
        )
        explained = []
        for canary in listed.json()["canaries"]:
            checks = await rollout.get(
                f"/api/v1/canaries/{canary['rollout_id']}/checks", headers=operator
            )
            explained += [
                f"{c['interval_index']} at {c['traffic_percent']}%: {c['status']} {c['reasons']}"
                for c in checks.json()["checks"][-5:]
            ]
        raise AssertionError(f"{error}; last checks: {explained}") from error
