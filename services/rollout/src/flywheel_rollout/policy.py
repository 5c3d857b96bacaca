"""How a canary runs, per project: Flagger's step weights, interval and failed-checks threshold.

The candidate gets ``steps[0]`` % of the traffic, then each next share, then 100 % (promotion).
Every ``interval_s`` one check compares the candidate with the champion on what both served in
that interval. A step is left once it has been held for ``bake_s`` and its checks passed; an
interval in which either version served fewer than ``min_requests`` does not count either way.
``threshold`` failed checks over the whole canary roll it back.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import pairwise
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["CanaryPolicy", "Margins", "policy_for"]


class Margins(BaseModel):
    """How much worse than the champion the candidate may be before a check fails."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    error_rate: float = Field(default=0.01, ge=0, le=1)
    """Absolute rise of the error rate allowed over the champion's (0.01: one point)."""

    latency_p95: float = Field(default=0.25, ge=0)
    """Relative rise of the 95th-percentile latency allowed over the champion's."""

    latency_p99: float = Field(default=0.5, ge=0)
    """Relative rise of the 99th-percentile latency allowed over the champion's."""

    latency_slack_ms: float = Field(default=5.0, ge=0)
    """Absolute latency rise always tolerated, so a few milliseconds of noise never fail a
    fast model."""

    correction_rate: float = Field(default=0.05, ge=0, le=1)
    """Absolute rise of the share of pre-fills labelers corrected, over the champion's."""

    min_agreement: float = Field(default=0.9, ge=0, le=1)
    """Least share of inputs both versions answered on which they gave the same class."""


class CanaryPolicy(BaseModel):
    """One project's canary policy (the service's default, or a project's override)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    steps: list[int] = Field(default_factory=lambda: [10, 50], min_length=1)
    """Traffic shares of the candidate, in percent, strictly rising and below 100; promotion
    to 100 % follows the last."""

    interval_s: float = Field(default=60.0, gt=0)
    """Length of one analysis interval: one check per interval."""

    bake_s: float = Field(default=300.0, ge=0)
    """Least time the candidate stays at each step, however well it does."""

    min_requests: int = Field(default=100, ge=1)
    """Requests each version must serve in an interval for its check to count."""

    min_passed_checks: int = Field(default=1, ge=1)
    """Passed checks a step needs (besides its bake time) before the next one."""

    threshold: int = Field(default=3, ge=1)
    """Failed checks that roll the canary back (Flagger's ``threshold``)."""

    min_feedback: int = Field(default=20, ge=1)
    """Pre-fills of each version labelers must have answered before correction rates are
    compared (counted over the whole canary: feedback is sparse)."""

    min_pairs: int = Field(default=20, ge=1)
    """Inputs answered by both versions in an interval before their agreement is judged."""

    outage_share: float = Field(default=0.5, gt=0, le=1)
    """Share of both versions' requests failing with an unavailable-dependency error from
    which an interval is an outage, never the candidate's fault."""

    waiting: Literal["queue", "supersede"] = "queue"
    """A version validated while its line has a canary running: ``queue`` waits behind the
    versions already waiting; ``supersede`` replaces them."""

    margins: Margins = Field(default_factory=Margins)
    """Tolerances of each metric."""

    @field_validator("steps")
    @classmethod
    def _rising_shares(cls, steps: list[int]) -> list[int]:
        if any(not 0 < step < 100 for step in steps):
            raise ValueError("every step must be a share between 1 and 99 percent")
        if any(b <= a for a, b in pairwise(steps)):
            raise ValueError("steps must rise strictly")
        return steps


def policy_for(
    project_id: str, default: CanaryPolicy, overrides: Mapping[str, CanaryPolicy]
) -> CanaryPolicy:
    """A project's policy: the default with the fields its override sets (margins too) replaced."""
    override = overrides.get(project_id)
    if override is None:
        return default
    merged: dict[str, Any] = default.model_dump()
    merged |= override.model_dump(include=override.model_fields_set - {"margins"})
    if "margins" in override.model_fields_set:
        margins = override.margins
        merged["margins"] |= margins.model_dump(include=margins.model_fields_set)
    return CanaryPolicy.model_validate(merged)
