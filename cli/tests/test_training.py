import asyncio
import json
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

import flywheel_cli.app as cli
from flywheel_cli.settings import CliSettings
from flywheel_cli.state import StackState
from flywheel_cli.training import SubmitError, entry_point_for, parse_hyperparameters
from flywheel_contracts import ModelTrainedV1
from flywheel_runtime.auth import generate_dev_key
from flywheel_runtime.topology import Topology
from flywheel_testing.events import EventProbe
from flywheel_testing.serving import digit_model_files
from flywheel_vision.contract import reference_signature
from flywheel_vision.export import labels_json

runner = CliRunner()

RUN_ID = "00000000-0000-4000-8000-00000000a001"


def invoke(tmp_path: Path, *args: str) -> Any:
    return runner.invoke(cli.app, ["--base-dir", str(tmp_path), *args])


# --- flywheel train submit ----------------------------------------------------------------------


def _run(state: str, **fields: Any) -> dict[str, Any]:
    return {
        "run_id": RUN_ID,
        "state": state,
        "project_id": "digits",
        "model_line": "digits-classifier",
        "registered_model": "digits-classifier",
        "log_tail": f"log while {state}",
        **fields,
    }


@pytest.fixture
def dispatch(monkeypatch: pytest.MonkeyPatch) -> Callable[[list[dict[str, Any]]], list[Any]]:
    """A fake trainer-dispatch: the POST queues the run, each GET answers the next state."""
    monkeypatch.setenv("FLYWHEEL_CLI_DEV_SIGNING_KEY", generate_dev_key())
    monkeypatch.setenv("FLYWHEEL_CLI_TRAIN_POLL_S", "0.01")

    def install(states: list[dict[str, Any]]) -> list[Any]:
        seen: list[httpx.Request] = []
        answers = iter(states)

        def answer(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            if request.method == "POST":
                return httpx.Response(202, json=_run("queued"))
            return httpx.Response(200, json=next(answers))

        def client(settings: CliSettings) -> httpx.AsyncClient:
            return httpx.AsyncClient(transport=httpx.MockTransport(answer))

        monkeypatch.setattr(cli, "http_client", client)
        return seen

    return install


def test_submit_sends_the_run_and_follows_it_until_it_succeeds(
    tmp_path: Path, dispatch: Callable[[list[dict[str, Any]]], list[Any]]
) -> None:
    script = tmp_path / "train.py"
    script.write_text("print('training')\n")
    seen = dispatch(
        [
            _run("queued"),
            _run("running"),
            _run(
                "succeeded",
                model_version="7",
                mlflow_run_id="abc123",
                metrics={"val_accuracy": 0.91},
            ),
        ]
    )

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        result = invoke(
            tmp_path,
            "train",
            "submit",
            "train.py",
            "--line",
            "digits-classifier",
            "--project",
            "digits",
            "--snapshot",
            "snap-1",
            "--nproc",
            "2",
            "-p",
            "epochs=1",
            "-p",
            "lr=0.01",
            "-p",
            "optimizer=sgd",
        )

    assert result.exit_code == 0, result.output
    assert "running" in result.output
    assert "succeeded: digits-classifier version 7 (MLflow run abc123)" in result.output
    post, *gets = seen
    assert post.url.path == "/v1/runs"
    assert post.url.port == 8083
    assert uuid.UUID(post.headers["Idempotency-Key"])
    assert json.loads(post.content) == {
        "project_id": "digits",
        "model_line": "digits-classifier",
        "snapshot_id": "snap-1",
        "priority": "manual",
        "entry_point": str(script.resolve()),
        "hyperparameters": {"epochs": 1, "lr": 0.01, "optimizer": "sgd"},
        "nproc_per_node": 2,
    }
    token = post.headers["Authorization"].removeprefix("Bearer ")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["realm_access"]["roles"] == ["operator"]
    assert [g.url.path for g in gets] == [f"/v1/runs/{RUN_ID}"] * 3


def test_a_failed_run_exits_1_with_its_reason_and_log(
    tmp_path: Path, dispatch: Callable[[list[dict[str, Any]]], list[Any]]
) -> None:
    seen = dispatch(
        [_run("failed", failure_reason="training exited with code 1", log_tail="Traceback …")]
    )

    result = invoke(
        tmp_path,
        "train",
        "submit",
        "my_pkg.train:main",
        "--line",
        "digits-classifier",
        "--snapshot",
        "snap-1",
    )

    assert result.exit_code == 1
    assert "failed: training exited with code 1" in result.output
    assert "Traceback" in result.output
    body = json.loads(seen[0].content)
    assert body["entry_point"] == "my_pkg.train:main"
    assert body["project_id"] == "digits-classifier"
    assert "hyperparameters" not in body
    assert "nproc_per_node" not in body


def test_hyperparameters_are_json_when_they_read_as_json_and_text_otherwise() -> None:
    assert parse_hyperparameters(["a=1", "b=0.5", "c=true", "d=[1, 2]", "e=adam", "f="]) == {
        "a": 1,
        "b": 0.5,
        "c": True,
        "d": [1, 2],
        "e": "adam",
        "f": "",
    }
    with pytest.raises(SubmitError, match="not key=value"):
        parse_hyperparameters(["epochs"])


def test_only_scripts_that_exist_here_become_absolute(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("")

    assert entry_point_for("train.py", tmp_path) == str(tmp_path / "train.py")
    assert entry_point_for("/opt/image/train.py", tmp_path) == "/opt/image/train.py"
    assert entry_point_for("pkg.mod:fn", tmp_path) == "pkg.mod:fn"


# --- flywheel runs / models, on a real MLflow -----------------------------------------------------


def _log_model(client: MlflowClient, run_id: str, *, with_onnx: bool = True) -> None:
    files = digit_model_files("any", "1", seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if with_onnx:
            (folder / "model.onnx").write_bytes(files.onnx)
        (folder / "labels.json").write_bytes(labels_json(files.labels))
        (folder / "model.json").write_text(reference_signature(10).model_dump_json())
        client.log_artifacts(run_id, tmp, artifact_path="model")


def _experiment_run(client: MlflowClient, line: str, **tags: str) -> str:
    experiment = client.get_experiment_by_name(line)
    experiment_id = (
        experiment.experiment_id if experiment is not None else client.create_experiment(line)
    )
    run = client.create_run(experiment_id, tags={"entry_point": "train.py", **tags})
    client.log_metric(run.info.run_id, "val_accuracy", 0.875)
    return str(run.info.run_id)


@pytest.mark.integration
def test_runs_and_models_list_a_line_with_versions_and_aliases(
    tmp_path: Path, mlflow_tracking_uri: str
) -> None:
    state = StackState(urls={"mlflow": mlflow_tracking_uri})
    (tmp_path / "state.json").write_text(state.model_dump_json())
    client = MlflowClient(mlflow_tracking_uri)
    line = f"line-{uuid.uuid4().hex[:8]}"
    registered = _experiment_run(client, line)
    _log_model(client, registered)
    experiment = _experiment_run(client, line)
    client.create_registered_model(line)
    run = client.get_run(registered)
    client.create_model_version(
        line,
        f"{run.info.artifact_uri}/model",
        run_id=registered,
        tags={"validation.verdict": "passed", "validation.accuracy": "0.9", "entry_point": "x"},
    )
    client.set_registered_model_alias(line, "champion", "1")

    runs = invoke(tmp_path, "runs", line, "--json")
    table = invoke(tmp_path, "runs", line)
    models = invoke(tmp_path, "models", "list", line, "--json")
    shown = invoke(tmp_path, "models", "list", line)

    assert runs.exit_code == 0, runs.output
    rows = {row["run_id"]: row for row in json.loads(runs.output)}
    assert rows[registered]["versions"] == ["1"]
    assert rows[experiment]["versions"] == []
    assert rows[experiment]["entry_point"] == "train.py"
    assert rows[experiment]["metrics"] == {"val_accuracy": 0.875}
    assert table.exit_code == 0
    assert "0.8750" in table.output
    assert models.exit_code == 0, models.output
    [version] = json.loads(models.output)
    assert (version["version"], version["aliases"], version["verdict"]) == (
        "1",
        ["champion"],
        "passed",
    )
    assert version["accuracy"] == 0.9
    assert "champion" in shown.output
    unknown = invoke(tmp_path, "models", "list", f"nope-{uuid.uuid4().hex[:6]}", "--json")
    assert json.loads(unknown.output) == []


@pytest.mark.integration
async def test_register_makes_a_version_of_an_experiment_run_and_announces_it(
    tmp_path: Path,
    mlflow_tracking_uri: str,
    rabbit_url: str,
    topology: Topology,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLYWHEEL_RABBIT_URL", rabbit_url)
    monkeypatch.setenv("FLYWHEEL_CLI_NAMESPACE", topology.namespace)
    client = MlflowClient(mlflow_tracking_uri)
    line = f"line-{uuid.uuid4().hex[:8]}"
    run_id = _experiment_run(
        client, line, project_id="digits", snapshot_id="snap-9", base_version="none"
    )
    _log_model(client, run_id)
    empty = _experiment_run(client, line, project_id="digits", snapshot_id="snap-9")
    _log_model(client, empty, with_onnx=False)
    (tmp_path / "state.json").write_text(
        StackState(
            urls={"mlflow": mlflow_tracking_uri}, namespace=topology.namespace
        ).model_dump_json()
    )

    async with EventProbe(rabbit_url, topology, ModelTrainedV1) as probe:
        first = await asyncio.to_thread(invoke, tmp_path, "models", "register", run_id, "--json")
        again = await asyncio.to_thread(invoke, tmp_path, "models", "register", run_id)
        refused = await asyncio.to_thread(invoke, tmp_path, "models", "register", empty)
        events = await probe.wait(ModelTrainedV1, n=2)

    assert first.exit_code == 0, first.output
    registration = json.loads(first.output)
    assert (registration["registered_model"], registration["version"]) == (line, "1")
    assert registration["created"] is True
    assert again.exit_code == 0, again.output
    assert f"already registered run {run_id} as {line} version 1" in again.output
    assert refused.exit_code == 1
    assert "has no model/model.onnx" in refused.output
    [version] = client.search_model_versions(f"name = '{line}'")
    assert version.run_id == run_id
    assert version.tags["snapshot_id"] == "snap-9"
    assert version.tags["registered_by"] == "flywheel models register"
    first_event, second_event = events
    # The same run is the same event: the validator judges it once.
    assert first_event.event_id == second_event.event_id
    payload = first_event.payload
    assert (payload.registered_model, payload.model_version) == (line, "1")
    assert (payload.model_line, payload.project_id, payload.snapshot_id) == (
        line,
        "digits",
        "snap-9",
    )
    assert payload.mlflow_run_id == run_id
    assert payload.base_model_version is None
    assert payload.metrics == {"val_accuracy": 0.875}
