import pytest
from pydantic import ValidationError

from flywheel_inference_bff.logworker.settings import LogWorkerSettings


def test_settings_read_their_own_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_LOGWORKER_BATCH_SIZE", "250")
    monkeypatch.setenv("FLYWHEEL_LOGWORKER_MAX_WAIT_S", "2.5")
    monkeypatch.setenv("FLYWHEEL_LOGWORKER_LOGS_BUCKET", "logs-here")
    monkeypatch.setenv("FLYWHEEL_DELIVERY_LIMIT", "7")

    settings = LogWorkerSettings()

    assert settings.batch_size == 250
    assert settings.max_wait_s == 2.5
    assert settings.logs_bucket == "logs-here"
    assert settings.http_port == 8087
    assert settings.platform.delivery_limit == 7


def test_prefetch_defaults_to_two_batches() -> None:
    assert LogWorkerSettings(batch_size=100).prefetch_count == 200
    assert LogWorkerSettings(batch_size=100, prefetch=100).prefetch_count == 100


def test_a_prefetch_below_the_batch_size_is_refused_since_no_batch_could_fill() -> None:
    with pytest.raises(ValidationError, match="prefetch 10 is below batch_size 100"):
        LogWorkerSettings(batch_size=100, prefetch=10)


def test_a_bucket_name_s3_would_refuse_is_refused_at_start() -> None:
    with pytest.raises(ValidationError, match="logs_bucket"):
        LogWorkerSettings(logs_bucket="Logs_Bucket")
