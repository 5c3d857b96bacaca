import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flywheel_runtime.errors import DependencyUnavailableError
from flywheel_testing.net import free_port
from flywheel_trainer_dispatch.adapters.mlflow_results import MlflowResults

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A file-backed MLflow store: the same registry code the server runs, without a server."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def results(tracking_uri: str) -> Iterator[MlflowResults]:
    reader = MlflowResults(tracking_uri, timeout_s=60)
    yield reader
    reader.close()


def _register_like_training(
    client: MlflowClient, run_id: uuid.UUID, *, base: str, world_size: int
) -> str:
    """What ``flywheel_vision.train`` leaves in MLflow: a run and a version tagged with the
    dispatcher's run id."""
    name = "digits-classifier"
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run = client.create_run(experiment_id, tags={"training_run_id": str(run_id)})
    client.log_metric(run.info.run_id, "val_accuracy", 0.9)
    client.log_metric(run.info.run_id, "val_accuracy", 0.95, step=1)
    client.log_param(run.info.run_id, "world_size", str(world_size))
    client.create_model_version(
        name,
        f"s3://flywheel-models/{run.info.run_id}/model",
        run_id=run.info.run_id,
        tags={"training_run_id": str(run_id), "base_version": base},
    )
    return str(run.info.run_id)


async def test_the_result_is_the_version_the_run_registered(
    tracking_uri: str, results: MlflowResults
) -> None:
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    fine_tuned, scratch = uuid.uuid4(), uuid.uuid4()
    mlflow_run = _register_like_training(client, fine_tuned, base="3", world_size=4)
    _register_like_training(client, scratch, base="none", world_size=1)

    output = await results.result(fine_tuned)
    from_scratch = await results.result(scratch)

    assert output is not None
    assert output.run_id == mlflow_run
    assert output.model_name == "digits-classifier"
    assert output.base_version == "3"
    assert output.metrics == {"val_accuracy": 0.95}
    assert output.world_size == 4
    assert output.training_run_id == str(fine_tuned)
    assert from_scratch is not None
    assert from_scratch.base_version is None
    assert int(from_scratch.version) > int(output.version)


async def test_a_run_that_registered_nothing_has_no_result(results: MlflowResults) -> None:
    assert await results.result(uuid.uuid4()) is None


async def test_an_mlflow_that_does_not_answer_is_retryable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    reader = MlflowResults(f"http://127.0.0.1:{free_port()}", timeout_s=30)

    with pytest.raises(DependencyUnavailableError):
        await reader.result(uuid.uuid4())
    reader.close()
