"""One label's way round the loop is one trace, exported over OTLP by every service.

A local OTLP/HTTP receiver decodes what the services' exporters send (protobuf
``ExportTraceServiceRequest`` on ``/v1/traces``). The services run in process on the real
RabbitMQ, PostgreSQL, S3 and MLflow, each built by its own ``create_app`` with
``otel_endpoint`` pointing at the receiver:

* **real**: labeling (a label posted over HTTP, ``labels.saved`` through its outbox),
  data-monitor (``threshold.reached`` at a one-label threshold), rollout (backend ``kserve``
  on the stand-in Kubernetes API, a test controller playing KServe; the first version has no
  champion, so the driver loop promotes it in the background and emits ``rollout.step`` and
  ``canary.verdict`` through the outbox) and inference-bff (consumes those to route);
* **stand-ins** for trainer-dispatch and validator, whose real work (minutes of training,
  evaluation against a snapshot) is too slow here: each is a FastStream broker built by the
  runtime's ``create_broker`` with its own ``service.name``, consuming the real upstream event
  and publishing the next one (``model.trained``; then a registered MLflow version and a
  passed ``model.validated``) from inside its consumer span, as the real handlers do.

The trace must be one tree: a single trace id for every span of the loop's correlation ids,
one root, every other span's parent received, and all six ``service.name`` values in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from faststream.rabbit import RabbitBroker
from mlflow import MlflowClient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from pydantic import SecretStr

from flywheel_clients.kubernetes import KubeConnection
from flywheel_clients.kubernetes_kserve import INFERENCE_SERVICE
from flywheel_clients.registry import LABELS_FILE, ONNX_FILE
from flywheel_contracts import (
    CanaryVerdictV1,
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
from flywheel_rollout.settings import KServeSettings, RolloutSettings
from flywheel_runtime.auth import AuthSettings, generate_dev_key, issue_dev_token
from flywheel_runtime.messaging import create_broker, publish_event, start_broker
from flywheel_runtime.settings import PlatformSettings
from flywheel_runtime.telemetry import Telemetry, setup_telemetry
from flywheel_runtime.topology import Topology
from flywheel_testing.events import EventProbe
from flywheel_testing.kubeapi import KubeApiServer
from flywheel_testing.net import LOCALHOST
from flywheel_testing.rabbit import delete_names
from flywheel_testing.s3 import S3Server
from flywheel_testing.serving import digit_model_files
from flywheel_testing.wait import wait_for
from flywheel_vision.data import load_mnist, to_png
from flywheel_vision.export import labels_json

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

PROJECT = "digits"
SERVICES = {
    "labeling",
    "data-monitor",
    "trainer-dispatch",
    "validator",
    "rollout",
    "inference-bff",
}
KSERVE_NAMESPACE = "serving"


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str | None
    conversation_id: str | None


class OtlpReceiver:
    """An OTLP/HTTP endpoint on a free local port that keeps every span it is sent."""

    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((LOCALHOST, 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="otlp", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _receive(self, path: str, body: bytes) -> None:
        if path != "/v1/traces":
            return  # metrics are accepted and dropped
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        received = []
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    span_attributes = {a.key: a.value.string_value for a in span.attributes}
                    received.append(
                        ReceivedSpan(
                            service=attributes.get("service.name", ""),
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex() or None,
                            conversation_id=span_attributes.get(
                                "messaging.message.conversation_id"
                            ),
                        )
                    )
        with self._lock:
            self._spans.extend(received)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver._receive(self.path, body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                """Quiet."""

        return Handler


def play_kserve(kube_api: KubeApiServer, name: str) -> None:
    """KServe's controller, briefly: every spec change becomes a ready revision that takes all
    the traffic (this test's version is promoted without a canary)."""
    path = INFERENCE_SERVICE.path(KSERVE_NAMESPACE, name)
    obj = kube_api.get(path)
    if obj is None:
        return
    generation = obj["metadata"]["generation"]
    if (obj.get("status") or {}).get("observedGeneration") == generation:
        return
    revision = f"{name}-predictor-{generation:05d}"
    kube_api.set_status(
        path,
        {
            "observedGeneration": generation,
            "conditions": [{"type": "Ready", "status": "True"}],
            "components": {
                "predictor": {
                    "latestCreatedRevision": revision,
                    "latestReadyRevision": revision,
                    "latestRolledoutRevision": revision,
                    "traffic": [{"revisionName": revision, "percent": 100, "latestRevision": True}],
                }
            },
        },
    )


@dataclass
class Loop:
    platform: PlatformSettings
    topology: Topology
    rabbit_url: str
    bucket: str
    receiver: OtlpReceiver
    kube_api: KubeApiServer
    key: str = field(default_factory=lambda: generate_dev_key("EC"))
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    stack: AsyncExitStack = field(default_factory=AsyncExitStack)
    apps: list[FastAPI] = field(default_factory=list)
    telemetries: list[Telemetry] = field(default_factory=list)

    @property
    def model_line(self) -> str:
        return f"digits-{self.suffix}"

    def schema(self, service: str) -> str:
        return f"{service.replace('-', '_')}_{self.suffix}"

    def bearer(self, subject: str, *roles: str) -> dict[str, str]:
        token = issue_dev_token(self.key, subject=subject, roles=roles)
        return {"Authorization": f"Bearer {token}"}

    async def start(self, app: FastAPI) -> httpx.AsyncClient:
        await self.stack.enter_async_context(app.router.lifespan_context(app))
        self.apps.append(app)
        self.telemetries.append(app.state.runtime.telemetry)
        return await self.stack.enter_async_context(
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60
            )
        )

    async def stand_in(self, service: str) -> RabbitBroker:
        """A broker of its own, traced as ``service`` and exporting to the receiver."""
        telemetry = setup_telemetry(service, otel_endpoint=self.receiver.url)
        self.telemetries.append(telemetry)
        broker = create_broker(
            self.rabbit_url, app_id=service, tracer_provider=telemetry.tracer_provider
        )
        self.stack.callback(telemetry.shutdown)
        return broker

    def register_version(self, seed: int) -> str:
        """A version of the line's model in MLflow, logged as the trainer logs its models."""
        uri = self.platform.mlflow_uri
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.create_registered_model(self.model_line)
        experiment_id = client.create_experiment(self.model_line)
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

    def flush(self) -> None:
        for telemetry in self.telemetries:
            telemetry.tracer_provider.force_flush()


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture
async def loop(
    rabbit_url: str,
    database_url: str,
    s3_server: S3Server,
    topology: Topology,
    unique_bucket: str,
    mlflow_tracking_uri: str,
    receiver: OtlpReceiver,
    kube_api: KubeApiServer,
) -> AsyncIterator[Loop]:
    platform = PlatformSettings(
        rabbit_url=SecretStr(rabbit_url),
        database_url=SecretStr(database_url),
        s3_endpoint=s3_server.endpoint,
        s3_access_key=SecretStr(s3_server.access_key),
        s3_secret_key=SecretStr(s3_server.secret_key),
        mlflow_uri=mlflow_tracking_uri,
        delivery_limit=topology.delivery_limit,
        otel_endpoint=receiver.url,
        log_json=False,
    )
    built = Loop(platform, topology, rabbit_url, unique_bucket, receiver, kube_api)
    async with built.stack:
        yield built
    queues = {q for app in built.apps for q in app.state.runtime.topology.queue_names}
    await delete_names(rabbit_url, sorted(queues), [])


async def start_stand_ins(loop: Loop) -> None:
    """trainer-dispatch and validator, each handing the next event on from its consumer."""
    topology = loop.topology
    trainer = await loop.stand_in("trainer-dispatch")
    validator = await loop.stand_in("validator")

    @trainer.subscriber(
        topology.queue("trainer-dispatch", ThresholdReachedV1),
        topology.exchange_for(ThresholdReachedV1),
    )
    async def on_threshold(event: ThresholdReachedV1) -> None:
        example = ModelTrainedV1.example()
        trained = ModelTrainedV1.model_validate(
            {
                "correlation_id": event.correlation_id,
                "causation_id": event.event_id,
                "payload": example.payload.model_dump(mode="json")
                | {
                    "project_id": event.payload.project_id,
                    "model_line": event.payload.model_line,
                    "registered_model": event.payload.model_line,
                    "snapshot_id": event.payload.snapshot_id,
                    "model_version": "1",
                    "base_model_version": None,
                },
            }
        )
        await publish_event(trainer, topology, trained)

    @validator.subscriber(
        topology.queue("validator", ModelTrainedV1), topology.exchange_for(ModelTrainedV1)
    )
    async def on_trained(event: ModelTrainedV1) -> None:
        version = await asyncio.to_thread(loop.register_version, 1)
        validated = ModelValidatedV1.model_validate(
            {
                "correlation_id": event.correlation_id,
                "causation_id": event.event_id,
                "payload": {
                    "project_id": event.payload.project_id,
                    "model_line": event.payload.model_line,
                    "registered_model": event.payload.registered_model,
                    "model_version": version,
                    "snapshot_id": event.payload.snapshot_id,
                    "verdict": "passed",
                },
            }
        )
        await publish_event(validator, topology, validated)

    for broker in (trainer, validator):
        await start_broker(broker, topology)
        loop.stack.push_async_callback(broker.stop)


async def start_services(loop: Loop) -> httpx.AsyncClient:
    """Consumers first (their queues must exist before anything is announced), then labeling."""
    common: dict[str, Any] = {"platform": loop.platform, "namespace": loop.topology.namespace}
    await loop.start(
        create_rollout(
            RolloutSettings(
                **common,
                db_schema=loop.schema("rollout"),
                backend="kserve",
                kserve=KServeSettings(
                    connection=KubeConnection(host=loop.kube_api.url),
                    namespace=KSERVE_NAMESPACE,
                    readiness_timeout_s=60,
                    poll_s=0.05,
                ),
                tick_s=0.2,
                drain_s=0.0,
                republish_s=3600,
            )
        )
    )
    await loop.start(
        create_bff(
            BffSettings(
                **common,
                db_schema=loop.schema("inference-bff"),
                data_bucket=loop.bucket,
                results_bucket=loop.bucket,
                default_model_line=loop.model_line,
                project_ids={loop.model_line: PROJECT},
                auth=AuthSettings(dev_signing_key=SecretStr(loop.key)),
            )
        )
    )
    await loop.start(
        create_data_monitor(
            DataMonitorSettings(
                **common,
                db_schema=loop.schema("data-monitor"),
                data_bucket=loop.bucket,
                tick_interval_s=0.2,
            )
        )
    )
    await start_stand_ins(loop)
    return await loop.start(
        create_labeling(
            LabelingSettings(
                **common,
                auth=AuthSettings(dev_signing_key=SecretStr(loop.key)),
                db_schema=loop.schema("labeling"),
                data_bucket=loop.bucket,
            )
        )
    )


async def kserve_controller(loop: Loop) -> None:
    while True:
        await asyncio.to_thread(play_kserve, loop.kube_api, loop.model_line)
        await asyncio.sleep(0.05)


async def test_one_label_to_its_promotion_is_one_connected_trace_across_six_services(
    loop: Loop,
) -> None:
    probe = await loop.stack.enter_async_context(
        EventProbe(
            loop.rabbit_url,
            loop.topology,
            ThresholdReachedV1,
            ModelValidatedV1,
            RolloutStepV1,
            CanaryVerdictV1,
        )
    )
    controller = asyncio.create_task(kserve_controller(loop))
    try:
        labeling = await start_services(loop)
        created = await labeling.post(
            "/v1/projects",
            headers=loop.bearer("ada", "admin"),
            json={
                "project_id": PROJECT,
                "name": "Digits",
                "class_names": [str(d) for d in range(10)],
                "model_line": loop.model_line,
                "policy": {"count": 1},
            },
        )
        assert created.status_code == 201, created.text
        images, classes = load_mnist("train", limit=1)
        posted = await labeling.post(
            f"/v1/projects/{PROJECT}/labels",
            headers=loop.bearer("labeler-1", "labeler"),
            files={"image": ("0.png", to_png(images[0]), "image/png")},
            data={"class_name": str(classes[0])},
        )
        assert posted.status_code == 201, posted.text

        [verdict] = await probe.wait(CanaryVerdictV1, timeout=120)
        [step] = await probe.wait(RolloutStepV1, timeout=30)
        assert step.payload.traffic_percent == 100
        [threshold] = probe.of(ThresholdReachedV1)
        correlation_ids = {str(threshold.correlation_id), str(verdict.correlation_id)}

        def bff_consumed_the_step() -> bool:
            loop.flush()
            return any(
                s.service == "inference-bff" and s.conversation_id == str(step.correlation_id)
                for s in loop.receiver.spans
            )

        async def routed() -> bool:
            return await asyncio.to_thread(bff_consumed_the_step)

        await wait_for(routed, timeout=60, message="the BFF's span of rollout.step exported")
    finally:
        controller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await controller
    await loop.stack.aclose()  # every service stops and flushes its spans

    spans = loop.receiver.spans
    ours = [s for s in spans if s.conversation_id in correlation_ids]
    trace_ids = {s.trace_id for s in ours}
    assert len(trace_ids) == 1, f"the loop's spans are in {len(trace_ids)} traces"
    [trace_id] = trace_ids
    tree = [s for s in spans if s.trace_id == trace_id]
    ids = {s.span_id for s in tree}
    orphans = [s for s in tree if s.parent_id is not None and s.parent_id not in ids]
    assert orphans == [], [f"{s.service}: {s.name}" for s in orphans]
    roots = [s for s in tree if s.parent_id is None]
    described = [f"{s.service}: {s.name} {s.span_id} <- {s.parent_id}" for s in tree]
    assert len(roots) == 1, described
    assert roots[0].service == "labeling", described
    assert {s.service for s in tree} >= SERVICES
