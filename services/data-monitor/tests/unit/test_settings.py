import pytest
from pydantic import ValidationError

from flywheel_data_monitor.settings import DataMonitorSettings


def test_settings_read_their_own_prefix_and_nested_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_DATA_MONITOR_TICK_INTERVAL_S", "0.5")
    monkeypatch.setenv("FLYWHEEL_DATA_MONITOR_DEFAULT_POLICY__COUNT", "250")
    monkeypatch.setenv("FLYWHEEL_DATA_MONITOR_DEFAULT_POLICY__ADAPTIVE__ENABLED", "true")
    monkeypatch.setenv("FLYWHEEL_DELIVERY_LIMIT", "7")

    settings = DataMonitorSettings()

    assert settings.tick_interval_s == 0.5
    assert settings.default_policy.count == 250
    assert settings.default_policy.adaptive.enabled
    assert settings.default_policy.cooldown_s == 0
    assert settings.platform.delivery_limit == 7
    assert settings.db_schema == "data_monitor"


def test_settings_refuse_a_schema_name_postgres_would_need_quoting() -> None:
    with pytest.raises(ValidationError, match="db_schema"):
        DataMonitorSettings(db_schema="Data-Monitor")
