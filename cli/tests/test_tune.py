import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

import flywheel_cli.app as cli
import flywheel_cli.tune as tune_module
from flywheel_cli.settings import CliSettings
from flywheel_cli.tune import TuneOutcome, TuneRequest, constraints_for
from flywheel_serving.repository import ServingOptions
from flywheel_serving.tuning import (
    GOLDEN_TAG,
    Constraints,
    GoldenPoint,
    LoadPoint,
    ServingConfig,
    Trial,
    TuningGrid,
    TuningResult,
)
from flywheel_testing.serving import digit_model_files, register_model_files

runner = CliRunner()
BASE = ServingOptions(flavour="python")
POINT = LoadPoint(
    concurrency=4, requests=300, errors=0, throughput_rps=900, p50_ms=2, p95_ms=3, p99_ms=4
)


def _outcome(request: TuneRequest, *, golden: bool) -> TuneOutcome:
    config = ServingConfig.of(BASE).model_copy(update={"max_queue_delay_microseconds": 0})
    baseline = Trial(config=ServingConfig.of(BASE), points=[POINT])
    result = TuningResult(
        model_name=request.model_line,
        version=request.version or "3",
        num_classes=10,
        hardware="test CPU",
        constraints=request.limits,
        grid=request.grid,
        base=request.base,
        trials=[baseline, Trial(config=config, points=[POINT], against=baseline.config)],
        golden=GoldenPoint(config=config, point=POINT, hardware="test CPU") if golden else None,
        baseline=baseline,
        started_at=datetime.now(UTC),
        seconds=1.0,
    )
    return TuneOutcome(result=result, project_id="digits", artifacts_uri="s3://x/serving")


def test_project_constraints_sit_between_the_defaults_and_the_flags(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLYWHEEL_CLI_DEFAULT_SERVING_CONSTRAINTS__MAX_P99_MS", "100")
    monkeypatch.setenv("FLYWHEEL_CLI_DEFAULT_SERVING_CONSTRAINTS__MIN_THROUGHPUT_RPS", "10")
    monkeypatch.setenv("FLYWHEEL_CLI_SERVING_CONSTRAINTS__digits__MAX_P99_MS", "50")
    settings = CliSettings()

    assert constraints_for(settings, "digits", Constraints()) == Constraints(
        max_p99_ms=50, min_throughput_rps=10
    )
    assert constraints_for(settings, "other", Constraints()) == Constraints(
        max_p99_ms=100, min_throughput_rps=10
    )
    assert constraints_for(settings, "digits", Constraints(max_p99_ms=20)) == Constraints(
        max_p99_ms=20, min_throughput_rps=10
    )


@pytest.mark.parametrize(("golden", "code"), [(True, 0), (False, 1)])
def test_tune_passes_flags_through_and_exits_1_without_a_golden_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, golden: bool, code: int
) -> None:
    seen: list[TuneRequest] = []

    async def fake(settings: Any, request: TuneRequest) -> TuneOutcome:
        seen.append(request)
        return _outcome(request, golden=golden)

    monkeypatch.setattr(tune_module, "run_tune", fake)

    result = runner.invoke(
        cli.app,
        [
            "--base-dir",
            str(tmp_path),
            "tune",
            "digits-classifier",
            "--version",
            "3",
            "--max-p99-ms",
            "25",
            "--concurrency",
            "1,8",
            "--instances",
            "1,3",
            "--triton-url",
            "triton:8000",
            "--no-log",
        ],
    )

    assert result.exit_code == code, result.output
    (request,) = seen
    assert request.version == "3"
    assert request.limits == Constraints(max_p99_ms=25)
    assert request.grid.concurrencies == (1, 8)
    assert request.grid.instance_counts == (1, 3)
    assert request.grid.max_batch_sizes == TuningGrid().max_batch_sizes
    assert request.triton_url == "triton:8000"
    assert not request.log
    assert ("golden" in result.output) is golden


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tune_profiles_a_registered_version_in_triton_and_records_its_golden_config(
    triton_server: Any, mlflow_tracking_uri: str, tmp_path: Path
) -> None:
    """The command end to end: the version from MLflow, the load on the real Triton, the
    golden configuration back on the version."""
    name = f"digits-{uuid.uuid4().hex[:8]}"
    version = register_model_files(mlflow_tracking_uri, digit_model_files(name, "1", seed=5))

    result = runner.invoke(
        cli.app,
        [
            "--base-dir",
            str(tmp_path),
            "tune",
            name,
            "--version",
            version,
            "--triton-url",
            triton_server.http_url,
            "--mlflow-uri",
            mlflow_tracking_uri,
            "--concurrency",
            "1,2",
            "--requests",
            "300",
            "--max-batch-sizes",
            "64",
            "--queue-delays-us",
            "0,500",
            "--instances",
            "1",
            "--json",
        ],
    )

    assert result.exit_code == 0, result.output
    outcome = TuneOutcome.model_validate_json(result.stdout)
    golden = outcome.result.golden
    assert golden is not None
    assert outcome.artifacts_uri is not None
    assert {trial.config.max_queue_delay_microseconds for trial in outcome.result.trials} == {
        0,
        500,
    }
    client = MlflowClient(tracking_uri=mlflow_tracking_uri, registry_uri=mlflow_tracking_uri)
    tags = client.get_model_version(name, version).tags
    assert GoldenPoint.model_validate_json(tags[GOLDEN_TAG]) == golden
