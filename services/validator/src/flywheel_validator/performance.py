"""The performance gate's rule: the candidate served as fast as the champion, within margins.

Both versions are driven on one Triton, in one run, at the same concurrency levels, several
rounds taking turns (see ``adapters.triton``). Each level's figures are the medians of its
rounds: on a shared machine a burst of load, or a rare quiet moment, moves one round of one
model, not the median of either (the best round would reward whichever model happened to get
the quiet moment). A model's throughput is then its best level among those that answered every
request (and met ``max_p99_ms``, when set), the way a golden point is chosen; its p99 is read at
the level where the champion reached its throughput, so both p99s come from the same load. The
candidate fails when its throughput is more than ``throughput_margin`` below the champion's, or
its p99 more than ``p99_margin`` (plus ``p99_slack_ms``, so a 1 ms → 2 ms change is not a
regression) above.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from pydantic import BaseModel, ConfigDict, Field

from flywheel_serving.tuning import LoadPoint
from flywheel_validator.gates import GateResult

__all__ = [
    "GATE",
    "LevelFigure",
    "PerformanceGate",
    "PerformanceOutcome",
    "check_performance",
    "headline",
    "not_measured",
    "per_level",
]

GATE: Final = "performance"
"""Name of the gate, and the first word of its reason line."""

# Ratios of measured figures; a candidate exactly on a margin must not fail by rounding.
_EPSILON = 1e-9


class PerformanceGate(BaseModel):
    """How much slower than the champion a candidate may serve."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    throughput_margin: float = Field(default=0.2, ge=0, le=1)
    """Largest fraction by which the candidate's throughput may fall below the champion's."""

    p99_margin: float = Field(default=0.5, ge=0)
    """Largest fraction by which the candidate's p99 may rise above the champion's."""

    p99_slack_ms: float = Field(default=2.0, ge=0)
    """Milliseconds the candidate's p99 may exceed the margin by: at a few milliseconds a
    fraction is mostly jitter."""

    max_p99_ms: float | None = Field(default=None, gt=0)
    """Levels whose p99 is above this do not count towards a model's throughput (the serving
    constraint a golden point is chosen under); None: every level counts."""


class LevelFigure(BaseModel):
    """One concurrency level of one model, over its rounds."""

    model_config = ConfigDict(frozen=True)

    concurrency: int
    throughput_rps: float
    """Median throughput of the rounds."""
    p99_ms: float
    """Median p99 of the rounds."""
    requests: int
    """Requests of every round together."""
    errors: int
    """Failed requests of every round together."""


@dataclass(frozen=True)
class PerformanceOutcome:
    """The gate's result and the figures behind it, for ``model.validated``."""

    result: GateResult
    candidate_metrics: dict[str, float]
    champion_metrics: dict[str, float]


def per_level(points: Sequence[LoadPoint]) -> dict[int, LevelFigure]:
    """Each concurrency level's median throughput and p99 over its points (rounds)."""
    by_level: dict[int, list[LoadPoint]] = {}
    for point in points:
        by_level.setdefault(point.concurrency, []).append(point)
    return {
        level: LevelFigure(
            concurrency=level,
            throughput_rps=statistics.median(p.throughput_rps for p in rounds),
            p99_ms=statistics.median(p.p99_ms for p in rounds),
            requests=sum(p.requests for p in rounds),
            errors=sum(p.errors for p in rounds),
        )
        for level, rounds in sorted(by_level.items())
    }


def headline(levels: dict[int, LevelFigure], max_p99_ms: float | None) -> LevelFigure | None:
    """The level with the highest throughput among those without errors within the p99 limit."""
    eligible = [
        level
        for level in levels.values()
        if level.errors == 0 and (max_p99_ms is None or level.p99_ms <= max_p99_ms)
    ]
    if not eligible:
        return None
    return max(eligible, key=lambda level: (level.throughput_rps, -level.concurrency))


def not_measured(cause: str) -> GateResult:
    """The line of a gate that did not run; it neither passes nor fails the candidate."""
    return GateResult(gate=GATE, passed=True, reason=f"{GATE} not compared ({cause}): skipped")


def check_performance(
    gate: PerformanceGate,
    candidate: Sequence[LoadPoint],
    champion: Sequence[LoadPoint],
) -> PerformanceOutcome:
    """Compare the load points of one run; the reason carries every figure it judged by."""
    candidate_levels, champion_levels = per_level(candidate), per_level(champion)
    candidate_best = headline(candidate_levels, gate.max_p99_ms)
    champion_best = headline(champion_levels, gate.max_p99_ms)
    eligible = "without errors" + (
        "" if gate.max_p99_ms is None else f" and p99 <= {gate.max_p99_ms:g} ms"
    )
    candidate_metrics = _metrics(candidate_best, candidate_levels)
    champion_metrics = _metrics(champion_best, champion_levels)
    if champion_best is None:
        return PerformanceOutcome(
            not_measured(f"the champion served no level {eligible}"),
            candidate_metrics,
            champion_metrics,
        )
    if candidate_best is None:
        reason = (
            f"{GATE}: candidate served no level {eligible} vs champion "
            f"{champion_best.throughput_rps:.0f} rps at concurrency {champion_best.concurrency}"
            f"{_errors(candidate_levels)}: fail"
        )
        return PerformanceOutcome(
            GateResult(gate=GATE, passed=False, reason=reason), candidate_metrics, champion_metrics
        )

    level = champion_best.concurrency
    # The levels are the same for both; a level the candidate lacks compares its own best.
    candidate_at_level = candidate_levels.get(level, candidate_best)
    candidate_metrics["serving_p99_ms"] = candidate_at_level.p99_ms
    change = candidate_best.throughput_rps / champion_best.throughput_rps - 1
    throughput_ok = change >= -gate.throughput_margin - _EPSILON
    p99_limit = champion_best.p99_ms * (1 + gate.p99_margin) + gate.p99_slack_ms
    p99_ok = candidate_at_level.p99_ms <= p99_limit + _EPSILON
    p99_change = candidate_at_level.p99_ms / champion_best.p99_ms - 1 if champion_best.p99_ms else 0
    passed = throughput_ok and p99_ok
    reason = (
        f"{GATE}: throughput candidate {candidate_best.throughput_rps:.0f} rps vs champion "
        f"{champion_best.throughput_rps:.0f} rps ({change:+.0%} "
        f"{'within' if throughput_ok else 'beyond'} -{gate.throughput_margin:.0%} margin); "
        f"p99 at concurrency {level} candidate {candidate_at_level.p99_ms:.1f} ms vs champion "
        f"{champion_best.p99_ms:.1f} ms ({p99_change:+.0%} "
        f"{'within' if p99_ok else 'beyond'} +{gate.p99_margin:.0%} margin "
        f"+ {gate.p99_slack_ms:g} ms): {'pass' if passed else 'fail'}"
    )
    return PerformanceOutcome(
        GateResult(gate=GATE, passed=passed, reason=reason), candidate_metrics, champion_metrics
    )


def _metrics(best: LevelFigure | None, levels: dict[int, LevelFigure]) -> dict[str, float]:
    """``serving_*`` numbers of one model: its throughput, where, its p99 there, its errors."""
    numbers = {
        "serving_rps": 0.0 if best is None else best.throughput_rps,
        "serving_requests": float(sum(level.requests for level in levels.values())),
        "serving_errors": float(sum(level.errors for level in levels.values())),
    }
    if best is not None:
        numbers["serving_concurrency"] = float(best.concurrency)
        numbers["serving_p99_ms"] = best.p99_ms
    return numbers


def _errors(levels: dict[int, LevelFigure]) -> str:
    failed = sum(level.errors for level in levels.values())
    requests = sum(level.requests for level in levels.values())
    return f" ({failed} of {requests} requests failed)" if failed else ""
