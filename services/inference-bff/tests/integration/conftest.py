import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from fastapi import FastAPI
from minio import Minio
from minio.deleteobjects import DeleteObject
from mlflow import MlflowClient
from pydantic import SecretStr

from flywheel_clients.registry import ModelFiles, ModelRegistry
from flywheel_contracts import Event
from flywheel_inference_bff.main import create_app
from flywheel_inference_bff.settings import BffSettings
from flywheel_runtime.auth import AuthSettings, generate_dev_key, issue_dev_token
from flywheel_runtime.messaging import create_broker, publish_event
from flywheel_runtime.settings import PlatformSettings
from flywheel_runtime.storage import ObjectStorage
from flywheel_runtime.topology import Topology
from flywheel_serving.repository import ServingOptions, sync_from_registry
from flywheel_serving.triton import TritonControl, TritonServer
from flywheel_testing.datasets import WrittenSnapshot, write_mnist_snapshot
from flywheel_testing.mlflow_server import MlflowServer
from flywheel_testing.s3 import S3Server
from flywheel_testing.serving import digit_model_files
from flywheel_vision.export import labels_json
from flywheel_vision.preprocess import INPUT_NAME, OUTPUT_NAME, preprocess

PROJECT = "digits"
KEY = generate_dev_key("EC")
TOKEN = issue_dev_token(KEY, subject="tester", roles=["predict"], expires_in=7200)
PREDICT = {"Authorization": f"Bearer {TOKEN}"}
SEEDS = {"1": 11, "2": 22}
"""Registered versions of the served model and the seeds of their weights."""


@dataclass(frozen=True)
class Served:
    """One registered model with two versions in MLflow, both loaded in the session's Triton;
    version 1 is the champion. A third version is registered but never loaded."""

    name: str
    files: dict[str, ModelFiles]
    unloaded_version: str
    bucket: str
    snapshot: WrittenSnapshot
    storage: ObjectStorage

    def expected(self, version: str, image: bytes) -> np.ndarray:
        """Class probabilities of ``image`` from onnxruntime in-process: the reference."""
        session = ort.InferenceSession(self.files[version].onnx, providers=["CPUExecutionProvider"])
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: preprocess(image)[np.newaxis]})
        shifted = np.asarray(logits, dtype=np.float64)[0]
        exp = np.exp(shifted - shifted.max())
        return exp / exp.sum()


def register(uri: str, folder: Path, files: ModelFiles) -> str:
    """A version whose source is a run's ``model/`` folder, as the trainer leaves it."""
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(files.name)
    experiment_id = (
        experiment.experiment_id if experiment is not None else client.create_experiment(files.name)
    )
    run = client.create_run(experiment_id)
    artifacts = folder / f"artifacts-{uuid.uuid4().hex[:8]}"
    artifacts.mkdir()
    (artifacts / "model.onnx").write_bytes(files.onnx)
    (artifacts / "labels.json").write_bytes(labels_json(files.labels))
    client.log_artifacts(run.info.run_id, str(artifacts), artifact_path="model")
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{files.name}'"):
        client.create_registered_model(files.name)
    version = client.create_model_version(
        files.name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    return str(version.version)


@pytest.fixture(scope="module")
async def served(
    tmp_path_factory: pytest.TempPathFactory,
    s3_server: S3Server,
    mlflow_server: MlflowServer,
    triton_server: TritonServer,
) -> AsyncIterator[Served]:
    name = f"digits-{uuid.uuid4().hex[:8]}"
    uri = mlflow_server.tracking_uri
    folder = tmp_path_factory.mktemp("models")
    files = {}
    for expected_version, seed in (*SEEDS.items(), ("3", 33)):
        version = register(uri, folder, digit_model_files(name, expected_version, seed))
        assert version == expected_version
        files[version] = digit_model_files(name, version, seed)
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(
        name, "champion", "1"
    )
    await sync_from_registry(
        ModelRegistry(uri),
        name,
        triton_server.repository,
        ServingOptions(flavour="python"),
        versions=list(SEEDS),
    )
    async with TritonControl(triton_server.http_url) as control:
        await control.load(name)
        for version in SEEDS:
            await control.wait_model_ready(name, version, timeout=60)
    storage = ObjectStorage(s3_server.endpoint, s3_server.access_key, s3_server.secret_key)
    bucket = f"flywheel-test-{uuid.uuid4().hex[:16]}"
    await storage.ensure_buckets(bucket)
    snapshot = await write_mnist_snapshot(storage, bucket, project_id=PROJECT, count=40)
    yield Served(name, files, "3", bucket, snapshot, storage)
    async with TritonControl(triton_server.http_url) as control:
        await control.unload(name)
    storage.close()
    _remove_bucket(s3_server, bucket)


def _remove_bucket(server: S3Server, name: str) -> None:
    client = Minio(server.endpoint, server.access_key, server.secret_key, secure=False)
    doomed = (DeleteObject(o.object_name) for o in client.list_objects(name, recursive=True))
    assert not list(client.remove_objects(name, doomed))
    client.remove_bucket(name)


@dataclass
class Bff:
    """The BFF on the real servers, in process, and a way to send it events."""

    app: FastAPI
    client: httpx.AsyncClient
    topology: Topology
    publisher: Any

    async def predict(self, image: bytes, **fields: Any) -> httpx.Response:
        return await self.client.post(
            "/predict",
            files={"image": ("digit.png", image, "image/png")},
            data={k: str(v) for k, v in fields.items()},
            headers=PREDICT,
        )

    async def publish(self, event: Event[Any]) -> None:
        await publish_event(self.publisher, self.topology, event)

    def metric(self, name: str, **labels: str) -> float:
        registry = self.app.state.runtime.telemetry.registry
        return sum(
            sample.value
            for family in registry.collect()
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )


@dataclass
class BffFactory:
    platform: PlatformSettings
    topology: Topology
    served: Served
    triton: TritonServer
    stack: AsyncExitStack
    rabbit_url: str
    publishers: list[Any] = field(default_factory=list)

    async def start(self, *, rabbit_url: str | None = None, **overrides: Any) -> Bff:
        platform = self.platform.model_copy(
            update={"rabbit_url": SecretStr(rabbit_url or self.rabbit_url)}
        )
        settings = BffSettings(
            platform=platform,
            namespace=self.topology.namespace,
            db_schema=f"bff_{uuid.uuid4().hex[:10]}",
            data_bucket=self.served.bucket,
            results_bucket=self.served.bucket,
            default_model_line=self.served.name,
            project_ids={self.served.name: PROJECT},
            auth=AuthSettings(dev_signing_key=SecretStr(KEY)),
            job_sweep_s=0.5,
            **overrides,
        )
        app = create_app(settings)
        await self.stack.enter_async_context(app.router.lifespan_context(app))
        transport = httpx.ASGITransport(app=app)
        client = await self.stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://bff.test", timeout=60)
        )
        publisher = create_broker(self.rabbit_url, app_id="rollout")
        await publisher.connect()
        self.stack.push_async_callback(publisher.stop)
        return Bff(app, client, self.topology, publisher)


@pytest.fixture
async def bff(
    rabbit_url: str,
    database_url: str,
    s3_server: S3Server,
    mlflow_server: MlflowServer,
    triton_server: TritonServer,
    served: Served,
    topology: Topology,
) -> AsyncIterator[BffFactory]:
    platform = PlatformSettings(
        rabbit_url=SecretStr(rabbit_url),
        database_url=SecretStr(database_url),
        s3_endpoint=s3_server.endpoint,
        s3_access_key=SecretStr(s3_server.access_key),
        s3_secret_key=SecretStr(s3_server.secret_key),
        mlflow_uri=mlflow_server.tracking_uri,
        triton_url=triton_server.http_url,
        delivery_limit=topology.delivery_limit,
    )
    async with AsyncExitStack() as stack:
        yield BffFactory(platform, topology, served, triton_server, stack, rabbit_url)
