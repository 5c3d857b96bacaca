import pytest
from pydantic import ValidationError

from flywheel_rollout.main import create_app
from flywheel_rollout.policy import CanaryPolicy, policy_for
from flywheel_rollout.settings import RolloutSettings


def test_settings_read_their_own_prefix_and_nested_policies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLYWHEEL_ROLLOUT_DEFAULT_POLICY__STEPS", "[5, 25, 50]")
    monkeypatch.setenv("FLYWHEEL_ROLLOUT_DEFAULT_POLICY__INTERVAL_S", "30")
    monkeypatch.setenv("FLYWHEEL_ROLLOUT_DEFAULT_POLICY__MARGINS__ERROR_RATE", "0.02")
    monkeypatch.setenv("FLYWHEEL_ROLLOUT_PROJECT_POLICIES__digits__THRESHOLD", "1")
    monkeypatch.setenv("FLYWHEEL_ROLLOUT_PROJECT_POLICIES__digits__MARGINS__LATENCY_P95", "0.1")
    monkeypatch.setenv("FLYWHEEL_ROLLOUT_SERVING__FLAVOUR", "python")
    monkeypatch.setenv("FLYWHEEL_TRITON_URL", "triton:8000")

    settings = RolloutSettings()

    assert settings.http_port == 8086
    assert settings.db_schema == "rollout"
    assert settings.default_policy.steps == [5, 25, 50]
    assert settings.serving.flavour == "python"
    assert settings.platform.triton_url == "triton:8000"
    digits = policy_for("digits", settings.default_policy, settings.project_policies)
    assert digits.threshold == 1
    assert digits.interval_s == 30  # not set by the override: the default's value
    assert digits.steps == [5, 25, 50]
    assert digits.margins.latency_p95 == 0.1
    assert digits.margins.error_rate == 0.02
    other = policy_for("letters", settings.default_policy, settings.project_policies)
    assert other == settings.default_policy


def test_project_policies_may_be_given_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "FLYWHEEL_ROLLOUT_PROJECT_POLICIES",
        '{"digits": {"steps": [20], "waiting": "supersede"}}',
    )

    settings = RolloutSettings()

    digits = policy_for("digits", settings.default_policy, settings.project_policies)
    assert digits.steps == [20]
    assert digits.waiting == "supersede"
    assert digits.bake_s == CanaryPolicy().bake_s


@pytest.mark.parametrize("steps", [[], [0, 50], [10, 100], [50, 10], [10, 10]])
def test_steps_must_be_rising_shares_below_one_hundred(steps: list[int]) -> None:
    with pytest.raises(ValidationError):
        CanaryPolicy(steps=steps)


def test_a_misspelt_policy_field_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_ROLLOUT_DEFAULT_POLICY__TRESHOLD", "2")

    with pytest.raises(ValidationError, match="treshold"):
        RolloutSettings()


def test_inference_logs_are_handled_a_bounded_number_at_a_time() -> None:
    app = create_app(RolloutSettings(log_prefetch=3))

    prefetch = {
        subscriber.queue.name: subscriber.channel.prefetch_count
        for subscriber in app.state.runtime.broker.subscribers
        if subscriber.channel is not None
    }

    assert prefetch == {"rollout.inference.logged": 3}
