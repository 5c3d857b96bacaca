import pytest
from pydantic import ValidationError

from flywheel_validator.gates import gates_for
from flywheel_validator.settings import ValidatorSettings


def test_settings_read_their_own_prefix_and_nested_gates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_VALIDATOR_DEFAULT_GATES__MIN_ACCURACY", "0.95")
    monkeypatch.setenv("FLYWHEEL_VALIDATOR_DEFAULT_GATES__MAX_LATENCY_P95_MS", "12.5")
    monkeypatch.setenv("FLYWHEEL_VALIDATOR_PROJECT_GATES__digits__MIN_CLASS_RECALL", "0.5")
    monkeypatch.setenv("FLYWHEEL_VALIDATOR_LATENCY_IMAGES", "20")
    monkeypatch.setenv("FLYWHEEL_MLFLOW_URI", "http://mlflow:5000")

    settings = ValidatorSettings()

    assert settings.default_gates.min_accuracy == 0.95
    assert settings.default_gates.max_latency_p95_ms == 12.5
    assert settings.latency_images == 20
    assert settings.platform.mlflow_uri == "http://mlflow:5000"
    assert settings.db_schema == "validator"
    assert settings.champion_alias == "champion"
    assert settings.challenger_alias == "challenger"
    digits = gates_for("digits", settings.default_gates, settings.project_gates)
    assert digits.min_class_recall == 0.5
    assert digits.min_accuracy == 0.95  # not set by the override: the default's value
    assert digits.max_latency_p95_ms == 12.5


def test_project_gates_may_be_given_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "FLYWHEEL_VALIDATOR_PROJECT_GATES",
        '{"digits": {"accuracy_tolerance": 0}, "letters": {"min_test_images": 500}}',
    )

    settings = ValidatorSettings()

    assert settings.project_gates["digits"].accuracy_tolerance == 0
    assert settings.project_gates["letters"].min_test_images == 500


def test_a_misspelt_gate_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_VALIDATOR_DEFAULT_GATES__MIN_ACCURACYY", "0.95")

    with pytest.raises(ValidationError, match="min_accuracyy"):
        ValidatorSettings()


def test_settings_refuse_a_schema_name_postgres_would_need_quoting() -> None:
    with pytest.raises(ValidationError, match="db_schema"):
        ValidatorSettings(db_schema="Validator-1")
