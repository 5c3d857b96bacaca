from datetime import UTC, datetime, timedelta

import pytest

from flywheel_contracts.events import AdaptivePolicy, RetrainPolicy, ThresholdReason
from flywheel_data_monitor.policy import (
    Evaluation,
    PendingWindow,
    adaptive_count,
    correction_rate,
    evaluate,
)

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _policy(**overrides: object) -> RetrainPolicy:
    return RetrainPolicy.model_validate({"count": 100, **overrides})


def _adaptive(**overrides: object) -> RetrainPolicy:
    adaptive = {
        "enabled": True,
        "baseline_correction_rate": 0.05,
        "sensitivity": 2.0,
        "min_count": 10,
        "min_prefilled": 20,
        **overrides,
    }
    return RetrainPolicy(count=100, adaptive=AdaptivePolicy.model_validate(adaptive))


def _window(
    labels: int, *, age_s: float | None = 0, prefilled: int = 0, corrected: int = 0
) -> PendingWindow:
    oldest = None if age_s is None or labels == 0 else NOW - timedelta(seconds=age_s)
    return PendingWindow(labels=labels, prefilled=prefilled, corrected=corrected, oldest_at=oldest)


def _evaluate(
    policy: RetrainPolicy, window: PendingWindow, last_fired_ago_s: float | None = None
) -> Evaluation:
    last = None if last_fired_ago_s is None else NOW - timedelta(seconds=last_fired_ago_s)
    return evaluate(policy, window, last_fired_at=last, now=NOW, policy_revision=3)


# --- fixed count --------------------------------------------------------------------------------


def test_count_fires_exactly_at_the_count() -> None:
    below = _evaluate(_policy(), _window(99))
    at = _evaluate(_policy(), _window(100))

    assert not below.fire
    assert below.reason is None
    assert below.explanation == "waiting: 99/100 labels"
    assert at.fire
    assert at.reason is ThresholdReason.COUNT
    assert at.effective_threshold == at.threshold == 100
    assert at.policy_revision == 3


def test_count_fires_above_the_count() -> None:
    result = _evaluate(_policy(), _window(250))

    assert result.fire
    assert result.reason is ThresholdReason.COUNT
    assert result.pending_labels == 250


def test_empty_window_never_fires() -> None:
    result = _evaluate(_policy(count=1, max_wait_s=1), _window(0, age_s=None))

    assert not result.fire
    assert result.oldest_pending_age_s is None


def test_count_of_one_fires_on_the_first_label() -> None:
    assert _evaluate(_policy(count=1), _window(1)).fire


# --- cooldown -----------------------------------------------------------------------------------


def test_count_reached_during_cooldown_is_deferred() -> None:
    result = _evaluate(_policy(cooldown_s=60), _window(100), last_fired_ago_s=10)

    assert not result.fire
    assert result.reason is None
    assert result.due_reason is ThresholdReason.COUNT
    assert result.in_cooldown
    assert result.cooldown_remaining_s == pytest.approx(50)
    assert "in cooldown for 50s more" in result.explanation


def test_deferred_retrain_fires_when_the_cooldown_ends() -> None:
    ended = _evaluate(_policy(cooldown_s=60), _window(100), last_fired_ago_s=60)
    almost = _evaluate(_policy(cooldown_s=60), _window(100), last_fired_ago_s=59.9)

    assert ended.fire
    assert ended.reason is ThresholdReason.COUNT
    assert not ended.in_cooldown
    assert ended.cooldown_remaining_s == 0
    assert not almost.fire


def test_no_cooldown_before_the_first_retrain() -> None:
    result = _evaluate(_policy(cooldown_s=3600), _window(100))

    assert result.fire
    assert result.last_fired_at is None
    assert not result.in_cooldown


def test_cooldown_alone_does_not_fire() -> None:
    result = _evaluate(_policy(cooldown_s=60), _window(5), last_fired_ago_s=120)

    assert not result.fire
    assert not result.in_cooldown
    assert result.due_reason is None


# --- max wait -----------------------------------------------------------------------------------


def test_max_wait_fires_on_fewer_labels_once_the_oldest_is_old_enough() -> None:
    waited = _evaluate(_policy(max_wait_s=600), _window(3, age_s=600))
    early = _evaluate(_policy(max_wait_s=600), _window(3, age_s=599))

    assert waited.fire
    assert waited.reason is ThresholdReason.MAX_WAIT
    assert waited.oldest_pending_age_s == pytest.approx(600)
    assert "max-wait 600s" in waited.explanation
    assert not early.fire
    assert early.explanation == "waiting: 3/100 labels, oldest 599s of max-wait 600s"


def test_without_max_wait_old_labels_wait_for_the_count() -> None:
    result = _evaluate(_policy(), _window(3, age_s=10**7))

    assert not result.fire
    assert result.max_wait_s is None


def test_max_wait_is_deferred_by_the_cooldown() -> None:
    result = _evaluate(
        _policy(max_wait_s=60, cooldown_s=600), _window(3, age_s=120), last_fired_ago_s=100
    )

    assert not result.fire
    assert result.due_reason is ThresholdReason.MAX_WAIT
    assert result.in_cooldown


def test_count_takes_precedence_over_max_wait() -> None:
    result = _evaluate(_policy(max_wait_s=60), _window(100, age_s=120))

    assert result.reason is ThresholdReason.COUNT


def test_a_label_from_the_future_has_age_zero() -> None:
    result = _evaluate(_policy(max_wait_s=60), _window(3, age_s=-30))

    assert result.oldest_pending_age_s == 0
    assert not result.fire


# --- adaptive -----------------------------------------------------------------------------------


def test_correction_rate_is_none_without_prefilled_labels_and_capped_at_one() -> None:
    assert correction_rate(0, 0) is None
    assert correction_rate(40, 10) == 0.25
    assert correction_rate(10, 15) == 1.0


@pytest.mark.parametrize(
    ("prefilled", "corrected", "expected"),
    [
        (100, 0, 100),  # below the baseline: the fixed count
        (100, 5, 100),  # at the baseline
        (100, 10, 90),  # rate 0.10: ceil(100 * (1 - 2 * 0.05)) = 90
        (100, 30, 50),  # rate 0.30: ceil(100 * 0.5)
        (60, 24, 30),  # rate 0.40: 100 * 0.30000000000000004 must stay 30
        (100, 52, 10),  # rate 0.52: ceil(100 * 0.06) = 6, floored at min_count 10
        (100, 100, 10),  # rate 1: negative product, floored at min_count
        (30, 10, 44),  # rate 1/3: ceil(100 * (1 - 2 * (1/3 - 0.05))) = ceil(43.33)
    ],
)
def test_adaptive_count_formula(prefilled: int, corrected: int, expected: int) -> None:
    result = adaptive_count(_adaptive(), prefilled, corrected)

    assert result.applied
    assert result.effective == expected


def test_adaptive_is_off_unless_enabled() -> None:
    result = adaptive_count(_adaptive(enabled=False), 100, 100)

    assert not result.applied
    assert result.effective == 100
    assert result.correction_rate == 1.0


def test_adaptive_needs_min_prefilled_labels() -> None:
    too_few = adaptive_count(_adaptive(min_prefilled=20), 19, 19)
    enough = adaptive_count(_adaptive(min_prefilled=20), 20, 20)

    assert not too_few.applied
    assert too_few.effective == 100
    assert enough.applied
    assert enough.effective == 10


def test_adaptive_never_raises_the_count() -> None:
    policy = RetrainPolicy(count=5, adaptive=AdaptivePolicy(enabled=True, min_count=50))

    assert adaptive_count(policy, 100, 100).effective == 5
    assert adaptive_count(policy, 100, 0).effective == 5


def test_zero_sensitivity_keeps_the_count() -> None:
    assert adaptive_count(_adaptive(sensitivity=0), 100, 100).effective == 100


def test_adaptive_fires_early_with_reason_adaptive() -> None:
    result = _evaluate(_adaptive(), _window(50, prefilled=100, corrected=30))

    assert result.fire
    assert result.reason is ThresholdReason.ADAPTIVE
    assert result.threshold == 100
    assert result.effective_threshold == 50
    assert result.correction_rate == pytest.approx(0.3)
    assert result.adaptive_applied
    assert "lowered by a correction rate of 30%" in result.explanation


def test_adaptive_below_the_lowered_count_waits() -> None:
    result = _evaluate(_adaptive(), _window(49, prefilled=100, corrected=30))

    assert not result.fire
    assert result.explanation.startswith("waiting: 49/50 labels")


def test_reason_is_count_when_the_fixed_count_was_reached_anyway() -> None:
    result = _evaluate(_adaptive(), _window(100, prefilled=100, corrected=30))

    assert result.reason is ThresholdReason.COUNT
    assert result.effective_threshold == 50
