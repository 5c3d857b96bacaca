import pytest
from pydantic import ValidationError

from flywheel_workspaces.policy import Quota
from flywheel_workspaces.settings import WorkspacesSettings


def test_pools_quotas_and_lifetimes_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLYWHEEL_WORKSPACES_GPUS", '{"a100": 8, "a100/mig-1g.10gb": 14}')
    monkeypatch.setenv("FLYWHEEL_WORKSPACES_QUOTA__MAX_GPUS", "4")
    monkeypatch.setenv("FLYWHEEL_WORKSPACES_QUOTA_OVERRIDES", '{"ada": {"max_gpus": 8}}')
    monkeypatch.setenv("FLYWHEEL_WORKSPACES_LIFETIME__IDLE_TIMEOUT_S", "900")

    settings = WorkspacesSettings()

    assert settings.gpus == {"a100": 8, "a100/mig-1g.10gb": 14}
    assert settings.quota == Quota(max_gpus=4, max_environments=2)  # one field changed
    assert settings.quota_of("ada") == Quota(max_gpus=8)
    assert settings.quota_of("bob") == settings.quota
    assert settings.lifetime.idle_timeout_s == 900
    assert settings.lifetime.max_ttl_s == 12 * 3600


@pytest.mark.parametrize("pool", ["A100", "a100/mig", "a100/shared", "a100/mig-9g.10gb"])
def test_a_pool_name_the_policy_cannot_draw_from_is_refused(pool: str) -> None:
    with pytest.raises(ValidationError, match="is not <kind>"):
        WorkspacesSettings(gpus={pool: 1})


def test_the_defaults_run_locally_on_port_8088_in_schema_workspaces() -> None:
    settings = WorkspacesSettings()

    assert (settings.http_port, settings.db_schema, settings.backend) == (
        8088,
        "workspaces",
        "local",
    )
    assert settings.auth is None
