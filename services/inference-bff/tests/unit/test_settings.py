import pytest
from pydantic import ValidationError

from flywheel_inference_bff.settings import BffSettings


def test_settings_read_their_own_prefix_and_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_BFF_TRITON_PROTOCOL", "grpc")
    monkeypatch.setenv("FLYWHEEL_BFF_REGISTERED_MODELS__digits", "digits-classifier")
    monkeypatch.setenv("FLYWHEEL_BFF_PROJECT_IDS", '{"digits-classifier": "digits"}')
    monkeypatch.setenv("FLYWHEEL_BFF_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("FLYWHEEL_BFF_LOG_ENABLED", "false")
    monkeypatch.setenv("FLYWHEEL_TRITON_URL", "triton:8000")

    settings = BffSettings()

    assert settings.http_port == 8085
    assert settings.triton_protocol == "grpc"
    assert settings.registered_models == {"digits": "digits-classifier"}
    assert settings.project_ids == {"digits-classifier": "digits"}
    assert settings.redis_url is not None
    assert settings.redis_url.get_secret_value() == "redis://127.0.0.1:6379/0"
    assert settings.log_enabled is False
    assert settings.platform.triton_url == "triton:8000"
    assert settings.db_schema == "inference_bff"
    assert settings.predict_role == "predict"


def test_settings_refuse_what_would_fail_later() -> None:
    with pytest.raises(ValidationError, match="triton_protocol"):
        BffSettings(triton_protocol="websocket")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="default_model_line"):
        BffSettings(default_model_line="Digits Classifier")
    with pytest.raises(ValidationError, match="db_schema"):
        BffSettings(db_schema="inference-bff")
