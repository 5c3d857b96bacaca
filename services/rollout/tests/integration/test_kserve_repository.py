"""The KServe backend writes each version's Triton repository where its storageUri points,
from the real registry into the real S3 server, once."""

import tempfile
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flywheel_clients.registry import LABELS_FILE, ONNX_FILE, ModelRegistry
from flywheel_rollout.adapters.kserve_repository import S3VersionRepositories, split_s3_uri
from flywheel_runtime.errors import InvalidInputError, NotFoundError
from flywheel_runtime.storage import ObjectStorage
from flywheel_serving.repository import ServingOptions
from flywheel_testing.serving import digit_model_files, digit_onnx
from flywheel_vision.export import labels_json

pytestmark = pytest.mark.integration


def register(uri: str, model: str, seed: int) -> str:
    """A version of ``model`` whose source holds a real ONNX digit classifier."""
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if not client.search_registered_models(f"name = '{model}'"):
        client.create_registered_model(model)
    experiment = client.get_experiment_by_name(model)
    experiment_id = (
        experiment.experiment_id if experiment is not None else client.create_experiment(model)
    )
    run = client.create_run(experiment_id)
    files = digit_model_files(model, "0", seed)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / ONNX_FILE).write_bytes(files.onnx)
        (Path(tmp) / LABELS_FILE).write_bytes(labels_json(files.labels))
        client.log_artifacts(run.info.run_id, tmp, artifact_path="model")
    client.set_terminated(run.info.run_id)
    version = client.create_model_version(
        model, f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    return str(version.version)


def test_split_s3_uri() -> None:
    assert split_s3_uri("s3://models/kserve/digits/3/") == ("models", "kserve/digits/3")
    assert split_s3_uri("s3://models") == ("models", "")
    with pytest.raises(InvalidInputError, match="s3://"):
        split_s3_uri("gs://models/x")
    with pytest.raises(InvalidInputError, match="bucket"):
        split_s3_uri("s3:///x")


async def test_each_version_gets_a_repository_of_its_own_written_once(
    mlflow_tracking_uri: str, storage: ObjectStorage, unique_bucket: str
) -> None:
    model = f"digits-{uuid.uuid4().hex[:8]}"
    first, second = register(mlflow_tracking_uri, model, 1), register(mlflow_tracking_uri, model, 2)
    registry = ModelRegistry(mlflow_tracking_uri)
    uri = f"s3://{unique_bucket}/kserve/{model}/{{}}/"
    prefix = f"kserve/{model}/{second}/{model}"

    repositories = S3VersionRepositories(registry, storage, ServingOptions())
    await repositories.publish(model, first, uri.format(first))
    await repositories.publish(model, second, uri.format(second))
    keys = set(await storage.list_keys(unique_bucket, "kserve/"))
    config = (await storage.get(unique_bucket, f"{prefix}/config.pbtxt")).decode()
    onnx = await storage.get(unique_bucket, f"{prefix}/{second}/model.onnx")
    # Written once: with the labels gone behind its back, neither this process nor a new one
    # (a restarted rollout finding config.pbtxt in the bucket) writes the version again.
    await storage.delete_many(unique_bucket, [f"{prefix}/{second}/labels.json"])
    await repositories.publish(model, second, uri.format(second))
    await S3VersionRepositories(registry, storage, ServingOptions()).publish(
        model, second, uri.format(second)
    )

    assert keys == {
        f"kserve/{model}/{v}/{model}/{name}"
        for v in (first, second)
        for name in ("config.pbtxt", f"{v}/model.onnx", f"{v}/labels.json")
    }
    assert 'platform: "onnxruntime_onnx"' in config
    assert f"specific {{ versions: [ {second} ] }}" in config
    assert onnx == digit_onnx(2)
    assert not await storage.exists(unique_bucket, f"{prefix}/{second}/labels.json")


async def test_an_unknown_version_writes_nothing(
    mlflow_tracking_uri: str, storage: ObjectStorage, unique_bucket: str
) -> None:
    model = f"digits-{uuid.uuid4().hex[:8]}"
    register(mlflow_tracking_uri, model, 1)
    repositories = S3VersionRepositories(
        ModelRegistry(mlflow_tracking_uri), storage, ServingOptions()
    )

    with pytest.raises(NotFoundError):
        await repositories.publish(model, "9", f"s3://{unique_bucket}/kserve/{model}/9/")

    assert await storage.list_keys(unique_bucket, "kserve/") == []
