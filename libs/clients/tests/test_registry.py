import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from flywheel_clients.registry import (
    CHALLENGER,
    CHAMPION,
    ModelRegistry,
    RegistryError,
)
from flywheel_runtime.errors import DependencyUnavailableError, InvalidInputError, NotFoundError
from flywheel_runtime.messaging import is_retryable
from flywheel_testing.net import free_port
from flywheel_testing.proxy import TcpProxy

pytestmark = pytest.mark.integration

ONNX = b"\x08\x07onnx-bytes"
STATE = b"PK\x03\x04weights"
CONFIG = 'name: "digits"\n'


@pytest.fixture
def tracking_uri(mlflow_tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    # The registry must reach MLflow through its own URI alone: with no process default and a
    # scratch working directory, anything that consults MLflow's globals fails (or leaves a
    # ./mlflow.db behind, which the tests check for).
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return mlflow_tracking_uri


def _register(
    uri: str, tmp_path: Path, name: str, files: dict[str, bytes], tags: dict[str, str] | None = None
) -> str:
    """A version whose source is a run's ``model/`` folder holding ``files``."""
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(name)
    experiment_id = (
        experiment.experiment_id if experiment is not None else client.create_experiment(name)
    )
    run = client.create_run(experiment_id)
    folder = tmp_path / f"artifacts-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    for file_name, data in files.items():
        (folder / file_name).write_bytes(data)
    if files:
        client.log_artifacts(run.info.run_id, str(folder), artifact_path="model")
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(
        name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=tags
    )
    return str(version.version)


def _files(classes: list[str] | None = None) -> dict[str, bytes]:
    return {
        "model.onnx": ONNX,
        "labels.json": json.dumps({"classes": classes or ["0", "1", "2"]}).encode(),
        "state_dict.pt": STATE,
        "config.pbtxt": CONFIG.encode(),
    }


async def test_aliases_are_set_read_moved_and_deleted(tracking_uri: str, tmp_path: Path) -> None:
    registry = ModelRegistry(tracking_uri)
    name = f"reg-{uuid.uuid4().hex[:8]}"

    assert await registry.get_alias(name, CHAMPION) is None  # no registered model yet
    first = _register(tracking_uri, tmp_path, name, _files(), tags={"snapshot_id": "snap-1"})
    second = _register(tracking_uri, tmp_path, name, _files())
    assert await registry.get_alias(name, CHAMPION) is None  # model, but no alias

    await registry.set_alias(name, CHAMPION, first)
    await registry.set_alias(name, CHALLENGER, second)
    await registry.set_alias(name, CHALLENGER, second)  # idempotent
    champion = await registry.get_alias(name, CHAMPION)
    await registry.set_alias(name, CHAMPION, second)
    moved = await registry.get_alias(name, CHAMPION)
    await registry.delete_alias(name, CHALLENGER)
    await registry.delete_alias(name, CHALLENGER)  # already gone: nothing happens

    assert champion is not None
    assert (champion.name, champion.version, champion.aliases) == (name, first, [CHAMPION])
    assert champion.tags == {"snapshot_id": "snap-1"}
    assert champion.source is not None
    assert champion.source.endswith("/model")
    assert champion.status == "READY"
    assert champion.created_at is not None
    assert moved is not None
    assert moved.version == second
    assert await registry.get_alias(name, CHALLENGER) is None
    assert not (tmp_path / "mlflow.db").exists()


async def test_versions_are_read_tagged_and_listed_with_their_aliases(
    tracking_uri: str, tmp_path: Path
) -> None:
    registry = ModelRegistry(tracking_uri)
    name = f"reg-{uuid.uuid4().hex[:8]}"
    versions = [_register(tracking_uri, tmp_path, name, _files()) for _ in range(3)]
    await registry.set_alias(name, CHAMPION, versions[0])
    await registry.set_alias(name, CHALLENGER, versions[2])

    await registry.set_tags(
        name, versions[2], {"validation.verdict": "passed", "validation.accuracy": "0.981"}
    )
    tagged = await registry.get_version(name, versions[2])
    listed = await registry.list_versions(name)

    assert tagged.tags == {"validation.verdict": "passed", "validation.accuracy": "0.981"}
    assert tagged.aliases == [CHALLENGER]
    assert [v.version for v in listed] == versions
    assert [v.aliases for v in listed] == [[CHAMPION], [], [CHALLENGER]]
    assert listed[2].tags["validation.verdict"] == "passed"


async def test_missing_models_and_versions_are_not_found(tracking_uri: str, tmp_path: Path) -> None:
    registry = ModelRegistry(tracking_uri)
    name = f"reg-{uuid.uuid4().hex[:8]}"
    _register(tracking_uri, tmp_path, name, _files())

    with pytest.raises(NotFoundError) as missing_version:
        await registry.get_version(name, "99")
    with pytest.raises(NotFoundError):
        await registry.get_version(f"{name}-nope", "1")
    with pytest.raises(NotFoundError):
        await registry.download_model_files(name, "99")
    with pytest.raises(NotFoundError):
        await registry.list_versions(f"{name}-nope")

    assert not is_retryable(missing_version.value)
    assert missing_version.value.details == {
        "operation": "get_version",
        "model": name,
        "version": "99",
    }
    assert tracking_uri not in missing_version.value.message


async def test_model_files_are_downloaded_through_the_clients_own_server(
    tracking_uri: str, tmp_path: Path
) -> None:
    registry = ModelRegistry(tracking_uri)
    name = f"reg-{uuid.uuid4().hex[:8]}"
    version = _register(tracking_uri, tmp_path, name, _files(["cat", "dog"]))

    files = await registry.download_model_files(name, version)

    assert (files.name, files.version) == (name, version)
    assert files.onnx == ONNX
    assert files.labels == ["cat", "dog"]
    assert files.state_dict == STATE
    assert files.config_pbtxt == CONFIG
    assert not (tmp_path / "mlflow.db").exists()


async def test_optional_files_may_be_missing_but_the_onnx_and_labels_may_not(
    tracking_uri: str, tmp_path: Path
) -> None:
    registry = ModelRegistry(tracking_uri)
    name = f"reg-{uuid.uuid4().hex[:8]}"
    minimal = _register(
        tracking_uri,
        tmp_path,
        name,
        {"model.onnx": ONNX, "labels.json": b'{"classes": ["a"]}'},
    )
    no_onnx = _register(tracking_uri, tmp_path, name, {"labels.json": b'{"classes": ["a"]}'})
    empty = _register(tracking_uri, tmp_path, name, {})
    bad_labels = _register(
        tracking_uri, tmp_path, name, {"model.onnx": ONNX, "labels.json": b'["a", "b"]'}
    )

    files = await registry.download_model_files(name, minimal)
    with pytest.raises(NotFoundError, match=r"model\.onnx"):
        await registry.download_model_files(name, no_onnx)
    with pytest.raises(NotFoundError, match=r"model\.onnx"):
        await registry.download_model_files(name, empty)
    with pytest.raises(InvalidInputError, match=r"labels\.json"):
        await registry.download_model_files(name, bad_labels)

    assert (files.state_dict, files.config_pbtxt) == (None, None)


async def test_labels_alone_are_downloaded_and_checked(tracking_uri: str, tmp_path: Path) -> None:
    registry = ModelRegistry(tracking_uri)
    name = f"reg-{uuid.uuid4().hex[:8]}"
    labelled = _register(tracking_uri, tmp_path, name, _files(["cat", "dog"]))
    no_labels = _register(tracking_uri, tmp_path, name, {"model.onnx": ONNX})
    bad_labels = _register(tracking_uri, tmp_path, name, {"labels.json": b'{"classes": []}'})

    labels = await registry.download_labels(name, labelled)
    with pytest.raises(NotFoundError, match=r"labels\.json"):
        await registry.download_labels(name, no_labels)
    with pytest.raises(InvalidInputError, match=r"labels\.json"):
        await registry.download_labels(name, bad_labels)
    with pytest.raises(NotFoundError):
        await registry.download_labels(name, "99")

    assert labels == ["cat", "dog"]
    assert not (tmp_path / "mlflow.db").exists()


async def test_an_unreachable_registry_is_a_retryable_outage(
    tracking_uri: str, tmp_path: Path
) -> None:
    name = f"reg-{uuid.uuid4().hex[:8]}"
    version = _register(tracking_uri, tmp_path, name, _files())
    host, port = tracking_uri.removeprefix("http://").rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    registry = ModelRegistry(f"http://127.0.0.1:{proxy.port}")
    assert (await registry.get_version(name, version)).version == version
    await proxy.stop()

    calls = [
        registry.ping(),
        registry.get_version(name, version),
        registry.get_alias(name, CHAMPION),
        registry.set_alias(name, CHALLENGER, version),
        registry.delete_alias(name, CHALLENGER),
        registry.set_tags(name, version, {"k": "v"}),
        registry.list_versions(name),
        registry.download_model_files(name, version),
    ]
    errors = []
    for call in calls:
        with pytest.raises(DependencyUnavailableError) as raised:
            await call
        errors.append(raised.value)

    await proxy.start()
    try:
        files = await registry.download_model_files(name, version)
    finally:
        await proxy.stop()
    assert all(is_retryable(e) for e in errors)
    assert all(str(proxy.port) not in e.message for e in errors)
    assert files.onnx == ONNX


# --- a server that answers with errors ----------------------------------------------------------


class _Answer:
    status = 503
    body = b"upstream unavailable"
    content_type = "text/plain"


class _ErrorHandler(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        self.send_response(_Answer.status)
        self.send_header("Content-Type", _Answer.content_type)
        self.send_header("Content-Length", str(len(_Answer.body)))
        self.end_headers()
        self.wfile.write(_Answer.body)

    do_GET = do_POST = do_PATCH = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def error_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _ErrorHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.mark.parametrize(
    ("status", "body", "content_type", "retryable"),
    [
        (503, b"upstream unavailable", "text/plain", True),
        (500, b'{"error_code": "INTERNAL_ERROR", "message": "db down"}', "application/json", True),
        (403, b'{"error_code": "PERMISSION_DENIED", "message": "no"}', "application/json", False),
    ],
)
async def test_server_errors_are_outages_and_refusals_are_not(
    error_server: str,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    body: bytes,
    content_type: str,
    retryable: bool,
) -> None:
    monkeypatch.setattr(_Answer, "status", status)
    monkeypatch.setattr(_Answer, "body", body)
    monkeypatch.setattr(_Answer, "content_type", content_type)
    registry = ModelRegistry(error_server)

    with pytest.raises((DependencyUnavailableError, RegistryError)) as raised:
        await registry.get_version("digits", "1")

    assert is_retryable(raised.value) is retryable
    assert isinstance(raised.value, RegistryError) is not retryable
