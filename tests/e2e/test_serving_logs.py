"""predictions → inference.logged → the log worker → Parquet in S3, read back once each; and a
batch job's pseudo labels accepted by labeling as they are, on the real servers and Triton."""

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pyarrow as pa
import pytest
from mlflow import MlflowClient
from pydantic import SecretStr

from flywheel_clients.registry import CHAMPION, ModelFiles
from flywheel_inference_bff.logworker.main import create_app as create_log_worker
from flywheel_inference_bff.logworker.reader import read_inference_logs
from flywheel_inference_bff.logworker.settings import LogWorkerSettings
from flywheel_inference_bff.main import create_app as create_bff
from flywheel_inference_bff.settings import BffSettings
from flywheel_labeling.main import create_app as create_labeling
from flywheel_labeling.settings import LabelingSettings
from flywheel_runtime.auth import AuthSettings
from flywheel_runtime.storage import ObjectStorage
from flywheel_serving.repository import ServingOptions, build_model_repository
from flywheel_serving.triton import TritonControl, TritonServer
from flywheel_testing.datasets import write_mnist_snapshot
from flywheel_testing.serving import digit_model_files
from flywheel_testing.wait import wait_for
from flywheel_vision.data import load_mnist, to_png
from flywheel_vision.export import labels_json

from .conftest import Loop

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROJECT = "digits"
PREDICTIONS = 50
SNAPSHOT_IMAGES = 12


def register_champion(tracking_uri: str, folder: Path, files: ModelFiles) -> None:
    """``files`` as version 1 of a new registered model (a run's ``model/`` folder, as the
    trainer leaves it), with the champion alias on it."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    run = client.create_run(client.create_experiment(files.name))
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(files.onnx)
    (folder / "labels.json").write_bytes(labels_json(files.labels))
    client.log_artifacts(run.info.run_id, str(folder), artifact_path="model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(files.name)
    version = client.create_model_version(
        files.name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    assert str(version.version) == "1"
    client.set_registered_model_alias(files.name, CHAMPION, "1")


async def serve(loop: Loop, triton: TritonServer, files: ModelFiles) -> None:
    """``files`` loaded in the session's Triton until the test ends."""
    build_model_repository(triton.repository, files.name, [files], ServingOptions(flavour="python"))
    control = await loop.stack.enter_async_context(TritonControl(triton.http_url))
    await control.load(files.name)
    loop.stack.push_async_callback(control.unload, files.name)
    await control.wait_model_ready(files.name, files.version, timeout=60)


async def predict_all(bff: httpx.AsyncClient, loop: Loop, pngs: list[bytes]) -> list[str]:
    """Every PNG through ``/predict``, 8 at a time; the prediction ids answered."""
    headers = loop.bearer("client", "predict")
    gate = asyncio.Semaphore(8)

    async def one(png: bytes) -> str:
        async with gate:
            answer = await bff.post(
                "/predict", files={"image": ("digit.png", png, "image/png")}, headers=headers
            )
        assert answer.status_code == 200, answer.text
        return str(answer.json()["prediction_id"])

    return list(await asyncio.gather(*(one(png) for png in pngs)))


async def logged_rows(
    storage: ObjectStorage, bucket: str, model_line: str, since: datetime, n: int
) -> pa.Table:
    """The model line's inference logs in S3 once there are at least ``n``."""

    async def enough() -> pa.Table | None:
        table = await read_inference_logs(
            storage,
            bucket,
            model_line=model_line,
            since=since,
            until=datetime.now(UTC) + timedelta(hours=1),
        )
        return table if table.num_rows >= n else None

    table: pa.Table = await wait_for(enough, timeout=60, message=f"{n} inference logs in S3")
    return table


async def test_every_prediction_lands_once_in_s3_and_pseudo_labels_go_back_to_labeling(
    loop: Loop,
    mlflow_tracking_uri: str,
    triton_server: TritonServer,
    storage: ObjectStorage,
    tmp_path: Path,
) -> None:
    model = f"digits-e2e-{uuid.uuid4().hex[:8]}"
    files = digit_model_files(model, "1", seed=5)
    await asyncio.to_thread(register_champion, mlflow_tracking_uri, tmp_path / "model", files)
    await serve(loop, triton_server, files)
    loop.with_mlflow(mlflow_tracking_uri)
    platform = loop.platform.model_copy(update={"triton_url": triton_server.http_url})
    namespace = loop.topology.namespace
    # The worker first: its queue must be bound before the BFF logs anything.
    await loop.start(
        create_log_worker(
            LogWorkerSettings(
                platform=platform, namespace=namespace, logs_bucket=loop.bucket, max_wait_s=0.3
            )
        )
    )
    labeling = await loop.start(
        create_labeling(
            LabelingSettings(
                platform=platform,
                auth=AuthSettings(dev_signing_key=SecretStr(loop.key)),
                namespace=namespace,
                db_schema=loop.schema("labeling"),
                data_bucket=loop.bucket,
            )
        )
    )
    bff = await loop.start(
        create_bff(
            BffSettings(
                platform=platform,
                auth=AuthSettings(dev_signing_key=SecretStr(loop.key)),
                namespace=namespace,
                db_schema=loop.schema("inference-bff"),
                data_bucket=loop.bucket,
                results_bucket=loop.bucket,
                default_model_line=model,
                project_ids={model: PROJECT},
                job_sweep_s=0.2,
            )
        )
    )
    since = datetime.now(UTC) - timedelta(minutes=1)
    images, _ = load_mnist("test", limit=PREDICTIONS)

    prediction_ids = await predict_all(bff, loop, [to_png(image) for image in images])

    table = await logged_rows(storage, loop.bucket, model, since, PREDICTIONS)
    assert table.num_rows == PREDICTIONS
    assert sorted(table.column("request_id").to_pylist()) == sorted(prediction_ids)
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert set(table.column("route").to_pylist()) == {"online"}
    assert set(table.column("project_id").to_pylist()) == {PROJECT}
    assert set(table.column("model_version").to_pylist()) == {"1"}

    created = await labeling.post(
        "/v1/projects",
        headers=loop.bearer("ada", "admin"),
        json={
            "project_id": PROJECT,
            "name": "Digits",
            "class_names": [str(d) for d in range(10)],
            "model_line": model,
            "policy": {"count": 10_000},
        },
    )
    assert created.status_code == 201, created.text
    snapshot = await write_mnist_snapshot(
        storage, loop.bucket, project_id=PROJECT, count=SNAPSHOT_IMAGES
    )
    predict = loop.bearer("client", "predict")
    queued = await bff.post(
        "/predict/batch",
        json={"snapshot_id": snapshot.snapshot_id, "project_id": PROJECT},
        headers=predict,
    )
    assert queued.status_code == 202, queued.text
    status_url = queued.json()["status_url"]

    async def succeeded() -> bool:
        state = (await bff.get(status_url, headers=predict)).json()["state"]
        assert state != "failed", state
        return bool(state == "succeeded")

    await wait_for(succeeded, timeout=60, message="batch job succeeded")
    results = await bff.get(f"{status_url}/results", headers=predict)
    lines = [json.loads(line) for line in results.text.splitlines()]
    assert len(lines) == SNAPSHOT_IMAGES

    saved = await labeling.post(
        f"/v1/projects/{PROJECT}/labels:batch",
        json={"items": [line["label"] for line in lines]},
        headers=loop.bearer("reviewer", "labeler"),
    )

    assert saved.status_code == 200, saved.text
    items = saved.json()["items"]
    assert [item["status"] for item in items] == ["created"] * SNAPSHOT_IMAGES
    assert {item["image_sha256"] for item in items} == {e.image_sha256 for e in snapshot.entries}
    # The job's predictions are logged too, each once, beside the online ones.
    table = await logged_rows(storage, loop.bucket, model, since, PREDICTIONS + SNAPSHOT_IMAGES)
    assert table.num_rows == PREDICTIONS + SNAPSHOT_IMAGES
    batch_ids = {line["prediction_id"] for line in lines}
    assert {row["request_id"] for row in table.to_pylist() if row["route"] == "batch"} == batch_ids
