import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from flywheel_trainer_dispatch.settings import TrainerDispatchSettings


def test_settings_read_their_own_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_TRAINER_DISPATCH_MAX_CONCURRENT_RUNS", "3")
    monkeypatch.setenv("FLYWHEEL_TRAINER_DISPATCH_NPROC_PER_NODE", "2")
    monkeypatch.setenv("FLYWHEEL_TRAINER_DISPATCH_RUNS_DIR", "scratch/runs")
    monkeypatch.setenv("FLYWHEEL_TRAINER_DISPATCH_TIMEOUT_S", "90")
    monkeypatch.setenv("FLYWHEEL_MLFLOW_URI", "http://mlflow:5000")

    settings = TrainerDispatchSettings()

    assert settings.max_concurrent_runs == 3
    assert settings.nproc_per_node == 2
    assert settings.runs_dir == Path("scratch/runs")
    assert settings.timeout_s == 90
    assert settings.platform.mlflow_uri == "http://mlflow:5000"
    assert settings.db_schema == "trainer_dispatch"
    assert settings.backend == "local"
    assert settings.auth is None
    assert settings.instance_id == ""
    assert settings.owner() == socket.gethostname()


def test_the_registered_model_is_named_after_the_model_line() -> None:
    assert TrainerDispatchSettings().registered_model("digits", "digits-clf") == "digits-clf"
    named = TrainerDispatchSettings(registered_model_name="{project_id}.{model_line}")
    assert named.registered_model("digits", "digits-clf") == "digits.digits-clf"


def test_a_registered_model_template_with_unknown_fields_is_refused() -> None:
    with pytest.raises(ValidationError, match="registered_model_name"):
        TrainerDispatchSettings(registered_model_name="{team}-{model_line}")


def test_settings_refuse_an_unknown_backend() -> None:
    with pytest.raises(ValidationError, match="backend"):
        TrainerDispatchSettings.model_validate({"backend": "slurm"})
