import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
import pytest
from minio import Minio
from minio.deleteobjects import DeleteObject
from mlflow import MlflowClient
from pydantic import SecretStr

from flywheel_contracts.datasets import (
    ManifestEntry,
    Split,
)
from flywheel_runtime.errors import InvalidInputError
from flywheel_runtime.settings import PlatformSettings
from flywheel_runtime.storage import ObjectStorage
from flywheel_testing.datasets import write_mnist_snapshot
from flywheel_testing.mlflow_server import MlflowServer
from flywheel_testing.s3 import S3Server
from flywheel_vision.contract import read_signature
from flywheel_vision.evaluate import evaluate
from flywheel_vision.export import read_labels
from flywheel_vision.model import EMBEDDING_SIZE
from flywheel_vision.preprocess import EMBEDDING_NAME, OUTPUT_NAME
from flywheel_vision.train import TrainConfig, TrainResult, resolve_version, train

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IMAGES = 1500
PROJECT = "digits"
ARTIFACT_FILES = {"model.onnx", "model.json", "config.pbtxt", "labels.json", "state_dict.pt"}


@dataclass(frozen=True)
class Snapshot:
    bucket: str
    snapshot_id: str
    entries: list[ManifestEntry]
    pngs: dict[str, bytes]


@pytest.fixture(scope="module")
async def snapshot(s3_server: S3Server) -> AsyncIterator[Snapshot]:
    """~1 500 MNIST digits as a labeling tool would leave them: PNGs and one segment."""
    bucket = f"flywheel-test-{uuid.uuid4().hex[:16]}"
    storage = ObjectStorage(s3_server.endpoint, s3_server.access_key, s3_server.secret_key)
    await storage.ensure_buckets(bucket)
    written = await write_mnist_snapshot(storage, bucket, project_id=PROJECT, count=IMAGES)
    storage.close()
    yield Snapshot(bucket, written.snapshot_id, written.entries, written.pngs)
    client = Minio(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, secure=False)
    doomed = (DeleteObject(o.object_name) for o in client.list_objects(bucket, recursive=True))
    assert not list(client.remove_objects(bucket, doomed))
    client.remove_bucket(bucket)


@pytest.fixture
def platform(
    s3_server: S3Server,
    mlflow_tracking_uri: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> PlatformSettings:
    # Training must reach MLflow through its settings alone: with no default tracking URI and
    # a scratch working directory, anything that consults MLflow's globals fails here.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return PlatformSettings(
        s3_endpoint=s3_server.endpoint,
        s3_access_key=SecretStr(s3_server.access_key),
        s3_secret_key=SecretStr(s3_server.secret_key),
        mlflow_uri=mlflow_tracking_uri,
    )


def _config(snapshot: Snapshot, model_name: str, **overrides: object) -> TrainConfig:
    settings: dict[str, object] = {
        "project_id": PROJECT,
        "snapshot_id": snapshot.snapshot_id,
        "model_name": model_name,
        "data_bucket": snapshot.bucket,
        "epochs": 2,
        "batch_size": 64,
        "seed": 3,
        "correlation_id": f"corr-{uuid.uuid4().hex[:8]}",
        "training_run_id": f"tr-{uuid.uuid4().hex[:8]}",
    }
    return TrainConfig.model_validate(settings | overrides)


def _single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def _check_run_and_version(
    client: MlflowClient, result: TrainResult, config: TrainConfig, base: str
) -> None:
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["epochs"], params["batch_size"], params["seed"]) == ("2", "64", "3")
    assert params["base_version"] == base
    assert int(params["train_images"]) + int(params["validation_images"]) < IMAGES
    tags = run.data.tags
    assert tags["snapshot_id"] == config.snapshot_id
    assert tags["base_version"] == base
    assert tags["correlation_id"] == config.correlation_id
    assert tags["training_run_id"] == config.training_run_id
    assert tags["git_sha"]
    assert tags["version.torch"].startswith("2.13")
    assert tags["hardware.cpu_count"] == str(os.cpu_count())
    assert tags["hardware.cuda_available"] == "false"
    losses = client.get_metric_history(result.run_id, "train_loss")
    assert [m.step for m in losses] == [0, 1]
    assert run.data.metrics["val_accuracy"] > 0.6
    assert run.data.metrics["parity_max_abs_diff"] < 1e-4
    listed = {Path(a.path).name for a in client.list_artifacts(result.run_id, "model")}
    assert listed == ARTIFACT_FILES

    version = client.get_model_version(config.model_name, result.version)
    assert version.run_id == result.run_id
    assert version.source == result.artifact_uri
    assert version.tags["snapshot_id"] == config.snapshot_id
    assert version.tags["base_version"] == base
    assert version.tags["correlation_id"] == config.correlation_id
    assert version.tags["training_run_id"] == config.training_run_id


def test_training_registers_a_version_and_the_next_one_starts_from_the_champion(
    snapshot: Snapshot,
    platform: PlatformSettings,
    mlflow_server: MlflowServer,
    s3_server: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _single_process(monkeypatch)
    client = MlflowClient(platform.mlflow_uri)
    name = f"digits-{uuid.uuid4().hex[:8]}"

    first_config = _config(snapshot, name)
    first = train(first_config, platform=platform)

    assert first is not None
    assert first.version == "1"
    assert first.base_version is None
    assert first.classes == [str(d) for d in range(10)]
    _check_run_and_version(client, first, first_config, base="none")

    # The registered files are what serving and the validator get: evaluate them on TEST.
    local = Path(client.download_artifacts(first.run_id, "model", str(tmp_path)))
    assert not (tmp_path / "mlflow.db").exists()
    assert read_labels((local / "labels.json").read_bytes()) == first.classes
    test_samples = [
        (snapshot.pngs[e.image_sha256], int(e.class_name))
        for e in snapshot.entries
        if e.split is Split.TEST
    ]
    evaluation = evaluate(local / "model.onnx", test_samples, latency_images=10)
    assert evaluation.accuracy > 0.6
    # The reference exports its 64-d features as the embedding, declared for serving.
    declared = read_signature((local / "model.json").read_bytes())
    assert declared.embedding_size == EMBEDDING_SIZE
    assert 'name: "embedding"' in (local / "config.pbtxt").read_text()
    session = ort.InferenceSession(str(local / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [output.name for output in session.get_outputs()] == [OUTPUT_NAME, EMBEDDING_NAME]
    if mlflow_server.artifacts_destination:
        bucket, _, prefix = mlflow_server.artifacts_destination.removeprefix("s3://").partition("/")
        s3 = Minio(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, secure=False)
        keys = {o.object_name for o in s3.list_objects(bucket, prefix=prefix, recursive=True)}
        assert any(key.endswith(f"{first.run_id}/artifacts/model/model.onnx") for key in keys)

    assert resolve_version(client, name, alias="champion") is None  # model, but no alias yet
    client.set_registered_model_alias(name, "champion", first.version)
    champion = resolve_version(client, name, alias="champion")
    assert champion is not None
    assert champion.version == first.version
    second_config = _config(snapshot, name)
    second = train(second_config, platform=platform)

    assert second is not None
    assert second.version == "2"
    assert second.base_version == "1"
    _check_run_and_version(client, second, second_config, base="1")
    assert client.get_run(second.run_id).data.params["base_head_reused"] == "True"


def test_torchrun_with_two_ranks_makes_one_run_and_one_version(
    snapshot: Snapshot,
    platform: PlatformSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _single_process(monkeypatch)
    name = f"digits-ddp-{uuid.uuid4().hex[:8]}"
    result_file = tmp_path / "result.json"
    env = os.environ | {
        "FLYWHEEL_S3_ENDPOINT": platform.s3_endpoint,
        "FLYWHEEL_S3_ACCESS_KEY": platform.s3_access_key.get_secret_value(),
        "FLYWHEEL_S3_SECRET_KEY": platform.s3_secret_key.get_secret_value(),
        "FLYWHEEL_MLFLOW_URI": platform.mlflow_uri,
        "FLYWHEEL_LOG_JSON": "true",
    }

    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "--tee=3",
            "-m",
            "flywheel_vision.train",
            "--project-id",
            PROJECT,
            "--snapshot-id",
            snapshot.snapshot_id,
            "--model-name",
            name,
            "--data-bucket",
            snapshot.bucket,
            "--epochs",
            "2",
            "--correlation-id",
            "corr-ddp",
            "--training-run-id",
            "tr-ddp",
            "--result-file",
            str(result_file),
        ],
        capture_output=True,
        text=True,
        timeout=150,
        env=env,
        cwd=tmp_path,
        check=False,
    )

    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    for rank in (0, 1):
        assert any(
            line.startswith(f"[default{rank}]:") and "epoch done" in line
            for line in output.splitlines()
        ), output[-4000:]
    result = json.loads(result_file.read_text())
    assert (result["version"], result["world_size"]) == ("1", 2)
    client = MlflowClient(platform.mlflow_uri)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [result["run_id"]]
    assert runs[0].data.params["world_size"] == "2"
    versions = client.search_model_versions(f"name = '{name}'")
    assert [v.version for v in versions] == ["1"]
    assert versions[0].tags["training_run_id"] == "tr-ddp"


EXAMPLE = (
    Path(__file__).resolve().parents[3]
    / "examples"
    / "bring-your-own-model"
    / "train_tiny_convnet.py"
)


def test_a_script_entry_point_is_run_checked_and_logged_as_an_experiment(
    snapshot: Snapshot,
    platform: PlatformSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _single_process(monkeypatch)
    client = MlflowClient(platform.mlflow_uri)
    name = f"byo-{uuid.uuid4().hex[:8]}"
    config = _config(
        snapshot,
        name,
        entry_point=str(EXAMPLE),
        epochs=1,
        hyperparameters={"batch_size": 32},
        register_version=False,
        model_line=name,
    )

    result = train(config, platform=platform)

    assert result is not None
    assert result.version is None
    assert client.search_model_versions(f"name = '{name}'") == []
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["entry_point"] == str(EXAMPLE)
    assert run.data.tags["model_line"] == name
    assert run.data.tags["architecture"] == "TinyConvNet"
    assert (run.data.params["batch_size"], run.data.params["input_size"]) == ("32", "32")
    assert {"train_loss", "val_accuracy", "train_seconds", "model_size_bytes"} <= set(
        run.data.metrics
    )
    listed = {Path(a.path).name for a in client.list_artifacts(result.run_id, "model")}
    assert listed == {"model.onnx", "model.json", "config.pbtxt", "labels.json"}
    local = Path(client.download_artifacts(result.run_id, "model", str(tmp_path)))
    assert "dims: [ 3, 32, 32 ]" in (local / "config.pbtxt").read_text()
    signature = json.loads((local / "model.json").read_text())
    assert signature["preprocessing"]["channels"] == 3
    assert signature["inputs"][0]["name"] == "image"

    broken = tmp_path / "broken.py"
    broken.write_text("print('trained, but forgot model.json')\n")
    with pytest.raises(InvalidInputError, match=r"left no model\.json"):
        train(_config(snapshot, name, entry_point=str(broken)), platform=platform)
    failed = client.search_runs(
        [client.get_experiment_by_name(name).experiment_id], "attributes.status = 'FAILED'"
    )
    assert len(failed) == 1
