import os
import uuid
from pathlib import Path

import psycopg2
import pytest
import urllib3
from minio import Minio
from mlflow import MlflowClient

from flywheel_testing.mlflow_server import (
    ENV_MLFLOW_URI,
    MlflowServer,
    mlflow_database,
    mlflow_for_tests,
    run_mlflow_server,
)
from flywheel_testing.s3 import S3Server

pytestmark = pytest.mark.integration


def _databases(admin_url: str) -> set[str]:
    connection = psycopg2.connect(admin_url)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT datname FROM pg_database")
            return {row[0] for row in cursor.fetchall()}
    finally:
        connection.close()


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_runs_params_and_artifacts_go_through_the_server_into_s3(
    mlflow_server: MlflowServer,
    mlflow_tracking_uri: str,
    s3_server: S3Server,
    tmp_path: Path,
) -> None:
    client = MlflowClient(mlflow_tracking_uri)
    experiment = client.create_experiment(f"fixture-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment)
    client.log_param(run.info.run_id, "answer", "42")
    note = tmp_path / "note.txt"
    note.write_text("hello")
    client.log_artifact(run.info.run_id, str(note), artifact_path="docs")
    client.set_terminated(run.info.run_id)

    downloaded = client.download_artifacts(run.info.run_id, "docs/note.txt", str(tmp_path / "d"))

    assert Path(downloaded).read_text() == "hello"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert client.get_run(run.info.run_id).data.params == {"answer": "42"}
    if mlflow_server.artifacts_destination:
        bucket, _, prefix = mlflow_server.artifacts_destination.removeprefix("s3://").partition("/")
        s3 = Minio(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, secure=False)
        keys = [o.object_name for o in s3.list_objects(bucket, prefix=prefix, recursive=True)]
        assert any(key.endswith(f"{run.info.run_id}/artifacts/docs/note.txt") for key in keys)


def test_registry_aliases_resolve_to_versions(mlflow_tracking_uri: str, tmp_path: Path) -> None:
    client = MlflowClient(mlflow_tracking_uri)
    name = f"fixture-model-{uuid.uuid4().hex[:8]}"
    run = client.create_run(client.create_experiment(name))
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    client.log_artifact(run.info.run_id, str(tmp_path / "weights.bin"), artifact_path="model")
    client.create_registered_model(name)
    version = client.create_model_version(
        name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags={"k": "v"}
    )

    client.set_registered_model_alias(name, "champion", version.version)

    resolved = client.get_model_version_by_alias(name, "champion")
    assert (resolved.version, resolved.tags) == (version.version, {"k": "v"})


@pytest.mark.slow
def test_a_started_server_leaves_no_process_and_no_database_behind(
    s3_server: S3Server, postgres_admin_url: str, unique_bucket: str, tmp_path: Path
) -> None:
    bucket = unique_bucket

    with (
        mlflow_database(postgres_admin_url) as store_uri,
        run_mlflow_server(
            tmp_path,
            backend_store_uri=store_uri,
            artifacts_destination=f"s3://{bucket}/mlflow",
            s3=s3_server,
        ) as server,
    ):
        database = store_uri.rsplit("/", 1)[1]
        assert store_uri.startswith("postgresql+psycopg2://")
        assert database in _databases(postgres_admin_url)
        response = urllib3.request("GET", f"{server.tracking_uri}/health", timeout=5.0)
        assert response.status == 200
        assert server.pid is not None
        assert _group_alive(server.pid)

    assert not _group_alive(server.pid)
    assert database not in _databases(postgres_admin_url)


def test_an_mlflow_named_in_the_environment_is_reused_as_it_is(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(ENV_MLFLOW_URI, "http://mlflow.example:5000/")
    unused = S3Server("127.0.0.1:1", "none", "none")

    with mlflow_for_tests(tmp_path, s3=unused, postgres_admin_url="postgresql://unused") as found:
        assert found == MlflowServer("http://mlflow.example:5000", "", None)
