import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
import tritonclient.http.aio as http_aio
from minio import Minio
from mlflow import MlflowClient
from tritonclient.http import InferInput, InferRequestedOutput

from flywheel_clients.registry import CHALLENGER, CHAMPION, ModelFiles, ModelRegistry
from flywheel_runtime.errors import NotFoundError
from flywheel_runtime.storage import ObjectStorage
from flywheel_serving.repository import (
    ServingOptions,
    build_model_repository,
    sync_from_registry,
    upload_repository,
)
from flywheel_serving.triton import TritonControl, TritonServer
from flywheel_testing.s3 import S3Server
from flywheel_testing.serving import digit_model_files, digit_onnx
from flywheel_vision.export import labels_json
from flywheel_vision.preprocess import INPUT_NAME, INPUT_SHAPE, OUTPUT_NAME

pytestmark = pytest.mark.integration

PYTHON = ServingOptions(flavour="python")


@pytest.fixture
async def registry(mlflow_tracking_uri: str) -> ModelRegistry:
    return ModelRegistry(mlflow_tracking_uri)


@pytest.fixture
def model_name() -> str:
    return f"digits-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def control(triton_server: TritonServer) -> AsyncIterator[TritonControl]:
    async with TritonControl(triton_server.http_url) as built:
        yield built


def _register(uri: str, tmp_path: Path, files: ModelFiles) -> str:
    """A version whose source is a run's ``model/`` folder: model.onnx, labels.json, model.json."""
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(files.name)
    experiment_id = (
        experiment.experiment_id if experiment is not None else client.create_experiment(files.name)
    )
    run = client.create_run(experiment_id)
    folder = tmp_path / f"artifacts-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(files.onnx)
    (folder / "labels.json").write_bytes(labels_json(files.labels))
    if files.model_json is not None:
        (folder / "model.json").write_bytes(files.model_json)
    client.log_artifacts(run.info.run_id, str(folder), artifact_path="model")
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{files.name}'"):
        client.create_registered_model(files.name)
    version = client.create_model_version(
        files.name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    return str(version.version)


async def _logits(url: str, model: str, version: str) -> npt.NDArray[np.float32]:
    images = np.random.default_rng(1).standard_normal((3, *INPUT_SHAPE)).astype(np.float32)
    tensor = InferInput(INPUT_NAME, list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=True)
    async with http_aio.InferenceServerClient(url) as client:
        result = await client.infer(
            model,
            [tensor],
            model_version=version,
            outputs=[InferRequestedOutput(OUTPUT_NAME, binary_data=True)],
        )
    return np.asarray(result.as_numpy(OUTPUT_NAME))


def _onnxruntime(seed: int) -> npt.NDArray[np.float32]:
    images = np.random.default_rng(1).standard_normal((3, *INPUT_SHAPE)).astype(np.float32)
    session = ort.InferenceSession(digit_onnx(seed), providers=["CPUExecutionProvider"])
    return np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: images})[0])


async def test_sync_serves_champion_and_challenger_from_one_server(
    registry: ModelRegistry,
    mlflow_tracking_uri: str,
    triton_server: TritonServer,
    control: TritonControl,
    model_name: str,
    tmp_path: Path,
) -> None:
    seeds = {"1": 11, "2": 12, "3": 13}
    for version, seed in seeds.items():
        registered = _register(
            mlflow_tracking_uri, tmp_path, digit_model_files(model_name, version, seed)
        )
        assert registered == version
    await registry.set_alias(model_name, CHAMPION, "1")
    await registry.set_alias(model_name, CHALLENGER, "3")

    served = await sync_from_registry(registry, model_name, triton_server.repository, PYTHON)
    await control.load(model_name)
    champion = await _logits(triton_server.http_url, model_name, "1")
    challenger = await _logits(triton_server.http_url, model_name, "3")
    await control.unload(model_name)

    model_dir = triton_server.repository / model_name
    assert served == [1, 3]
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "3", "config.pbtxt"]
    assert (model_dir / "3" / "model.onnx").read_bytes() == digit_onnx(13)
    assert "specific { versions: [ 1, 3 ] }" in (model_dir / "config.pbtxt").read_text()
    # Both versions declare the embedding in their model.json, so the config serves it.
    assert 'name: "embedding"' in (model_dir / "config.pbtxt").read_text()
    assert np.allclose(champion, _onnxruntime(11), atol=1e-5)
    assert np.allclose(challenger, _onnxruntime(13), atol=1e-5)


async def test_sync_serves_versions_named_explicitly_and_fails_with_nothing_to_serve(
    registry: ModelRegistry, mlflow_tracking_uri: str, model_name: str, tmp_path: Path
) -> None:
    for version, seed in {"1": 21, "2": 22}.items():
        _register(mlflow_tracking_uri, tmp_path, digit_model_files(model_name, version, seed))
    root = tmp_path / "repository"

    with pytest.raises(NotFoundError, match="no model version to serve"):
        await sync_from_registry(registry, model_name, root, PYTHON)
    served = await sync_from_registry(registry, model_name, root, PYTHON, versions=["2"])
    with pytest.raises(NotFoundError):
        await sync_from_registry(registry, model_name, root, PYTHON, versions=["9"])

    assert served == [2]
    assert sorted(p.name for p in (root / model_name).iterdir()) == ["2", "config.pbtxt"]


def _keys(s3: S3Server, bucket: str) -> set[str]:
    client = Minio(s3.endpoint, s3.access_key, s3.secret_key, secure=False)
    return {str(o.object_name) for o in client.list_objects(bucket, recursive=True)}


async def test_upload_mirrors_the_repository_and_triton_serves_it_from_s3(
    storage: ObjectStorage,
    unique_bucket: str,
    s3_server: S3Server,
    model_name: str,
    tmp_path: Path,
) -> None:
    root = tmp_path / "repository"
    other = f"{model_name}-other"
    build_model_repository(root, other, [digit_model_files(other, "1", 1)], PYTHON)
    await upload_repository(storage, unique_bucket, "serving", root, other)
    build_model_repository(
        root, model_name, [digit_model_files(model_name, v, int(v)) for v in "12"], PYTHON
    )
    await upload_repository(storage, unique_bucket, "serving", root, model_name)
    build_model_repository(
        root, model_name, [digit_model_files(model_name, v, int(v)) for v in "23"], PYTHON
    )

    uri = await upload_repository(storage, unique_bucket, "/serving/", root, model_name)

    version_files = ["model.onnx", "labels.json", "model.py"]
    assert uri == f"s3://{s3_server.endpoint}/{unique_bucket}/serving"
    assert _keys(s3_server, unique_bucket) == {
        f"serving/{model_name}/config.pbtxt",
        *(f"serving/{model_name}/{v}/{f}" for v in "23" for f in version_files),
        f"serving/{other}/config.pbtxt",  # another model under the prefix is left alone
        *(f"serving/{other}/1/{f}" for f in version_files),
    }
    credentials = {
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with TritonServer.start(uri, env=credentials) as server:
        async with TritonControl(server.http_url) as control:
            await control.load(model_name)
            ready = [await control.model_ready(model_name, v) for v in "123"]
            served = await _logits(server.http_url, model_name, "3")
    assert ready == [False, True, True]
    assert np.allclose(served, _onnxruntime(3), atol=1e-5)
