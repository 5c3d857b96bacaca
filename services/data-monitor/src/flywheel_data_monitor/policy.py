"""When a project's pending labels call for a retrain: pure functions of policy, window and time.

The *pending window* is every label counted since the snapshot of the last retrain (labels of
quarantined batches are never counted, deletes never count). A retrain fires when

* the window holds at least the *effective count* of labels (reason ``count``, or ``adaptive``
  when only the adaptive rule made the count reachable), or
* ``max_wait_s`` is set, the window is not empty and its oldest label is at least that old
  (reason ``max_wait``),

and the project is not in its cooldown (``cooldown_s`` since the last retrain). A retrain that
is due during the cooldown is not dropped: the timer fires it once the cooldown has ended.

Adaptive rule. Labelers correcting the champion's pre-fills more often than usual is a sign the
data moved away from what the model knows, so the count falls as the correction rate rises::

    rate      = corrected / prefilled                       (over the pending window, at most 1)
    effective = ceil(count * (1 - sensitivity * max(0, rate - baseline_correction_rate)))
    effective = min(count, max(min_count, effective))

It applies only when ``adaptive.enabled`` and the window holds at least ``min_prefilled``
pre-filled labels (fewer give too noisy a rate); otherwise the effective count is ``count``.
The rule only ever lowers the count: a ``min_count`` above ``count`` does not raise it.
"""

from __future__ import annotations

import math
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from flywheel_contracts.events import RetrainPolicy, ThresholdReason

_ROUNDING_DIGITS = 9
"""Decimal digits kept before ``ceil``, so 0.30000000000000004 * 100 stays 30, not 31."""


class PendingWindow(BaseModel):
    """The labels counted since the last retrain's snapshot."""

    model_config = ConfigDict(frozen=True)

    labels: int = Field(default=0, ge=0)
    prefilled: int = Field(default=0, ge=0)
    """Of ``labels``, those that answered a model pre-fill."""
    corrected: int = Field(default=0, ge=0)
    """Of the pre-filled ones, those whose class the labeler changed."""
    oldest_at: datetime | None = None
    """When the oldest pending label was saved; None when the window is empty."""


class AdaptiveCount(BaseModel):
    """The count the adaptive rule arrived at, and from what."""

    model_config = ConfigDict(frozen=True)

    effective: int
    correction_rate: float | None
    """corrected / prefilled over the window; None without pre-filled labels."""
    applied: bool
    """Whether the rule was trusted (enabled and enough pre-filled labels)."""


class Evaluation(BaseModel):
    """One look at a project: every input of the decision, and the decision."""

    model_config = ConfigDict(frozen=True)

    evaluated_at: datetime
    fire: bool
    reason: ThresholdReason | None
    """Why it fired; None when it did not."""
    due_reason: ThresholdReason | None
    """Why it is due, fired or not: set while a due retrain waits out the cooldown."""
    explanation: str
    """One line for an operator: why it fired, or what it waits for."""
    policy_revision: int
    """Revision of the project.configured the policy came from; 0 for the service defaults."""
    pending_labels: int
    threshold: int
    """The policy's fixed count."""
    effective_threshold: int
    """The count after the adaptive rule."""
    prefilled: int
    corrected: int
    correction_rate: float | None
    adaptive_applied: bool
    cooldown_s: int
    last_fired_at: datetime | None
    in_cooldown: bool
    cooldown_remaining_s: float
    max_wait_s: int | None
    oldest_pending_at: datetime | None
    oldest_pending_age_s: float | None


def correction_rate(prefilled: int, corrected: int) -> float | None:
    """Share of pre-filled labels the labelers corrected; None when nothing was pre-filled."""
    if prefilled <= 0:
        return None
    return min(1.0, corrected / prefilled)


def adaptive_count(policy: RetrainPolicy, prefilled: int, corrected: int) -> AdaptiveCount:
    """The count after the adaptive rule (see the module docstring for the formula)."""
    rate = correction_rate(prefilled, corrected)
    adaptive = policy.adaptive
    if not adaptive.enabled or rate is None or prefilled < adaptive.min_prefilled:
        return AdaptiveCount(effective=policy.count, correction_rate=rate, applied=False)
    excess = max(0.0, rate - adaptive.baseline_correction_rate)
    scaled = math.ceil(round(policy.count * (1 - adaptive.sensitivity * excess), _ROUNDING_DIGITS))
    effective = min(policy.count, max(adaptive.min_count, scaled))
    return AdaptiveCount(effective=effective, correction_rate=rate, applied=True)


def evaluate(
    policy: RetrainPolicy,
    window: PendingWindow,
    *,
    last_fired_at: datetime | None,
    now: datetime,
    policy_revision: int,
) -> Evaluation:
    """Decide whether the project retrains now, and record why (or why not)."""
    count = adaptive_count(policy, window.prefilled, window.corrected)
    age = None if window.oldest_at is None else max(0.0, (now - window.oldest_at).total_seconds())
    since_fired = None if last_fired_at is None else (now - last_fired_at).total_seconds()
    remaining = 0.0 if since_fired is None else max(0.0, policy.cooldown_s - since_fired)
    in_cooldown = remaining > 0

    count_reached = window.labels > 0 and window.labels >= count.effective
    waited_out = (
        window.labels > 0
        and policy.max_wait_s is not None
        and age is not None
        and age >= policy.max_wait_s
    )
    reason: ThresholdReason | None = None
    if count_reached:
        reason = (
            ThresholdReason.COUNT if window.labels >= policy.count else ThresholdReason.ADAPTIVE
        )
    elif waited_out:
        reason = ThresholdReason.MAX_WAIT
    fire = reason is not None and not in_cooldown

    return Evaluation(
        evaluated_at=now,
        fire=fire,
        reason=reason if fire else None,
        due_reason=reason,
        explanation=_explain(policy, window, count, reason, remaining, age),
        policy_revision=policy_revision,
        pending_labels=window.labels,
        threshold=policy.count,
        effective_threshold=count.effective,
        prefilled=window.prefilled,
        corrected=window.corrected,
        correction_rate=count.correction_rate,
        adaptive_applied=count.applied,
        cooldown_s=policy.cooldown_s,
        last_fired_at=last_fired_at,
        in_cooldown=in_cooldown,
        cooldown_remaining_s=remaining,
        max_wait_s=policy.max_wait_s,
        oldest_pending_at=window.oldest_at,
        oldest_pending_age_s=age,
    )


def _explain(
    policy: RetrainPolicy,
    window: PendingWindow,
    count: AdaptiveCount,
    reason: ThresholdReason | None,
    cooldown_remaining_s: float,
    age: float | None,
) -> str:
    progress = f"{window.labels}/{count.effective} labels"
    if count.applied and count.effective < policy.count:
        progress += (
            f" (count {policy.count} lowered by a correction rate of {count.correction_rate:.0%})"
        )
    if reason is None:
        if window.labels and policy.max_wait_s is not None and age is not None:
            return f"waiting: {progress}, oldest {age:.0f}s of max-wait {policy.max_wait_s}s"
        return f"waiting: {progress}"
    due = (
        f"oldest label waited {age:.0f}s >= max-wait {policy.max_wait_s}s ({progress})"
        if reason is ThresholdReason.MAX_WAIT
        else progress
    )
    if cooldown_remaining_s > 0:
        return f"due ({due}) but in cooldown for {cooldown_remaining_s:.0f}s more"
    return f"fired: {due}"
