"""One check of a canary: the candidate against the champion on one interval, pure functions.

What each version served is kept as a ``Window``: counters and a fixed latency histogram per
version and interval, so storage stays bounded however much traffic flows. Percentiles are read
from the histogram as Prometheus' ``histogram_quantile`` does (linear within a bucket).

A check is ``outage`` when most requests of *both* versions failed with an unavailable-dependency
error: the serving stack was down, which says nothing about the candidate. Requests that never
reached a model (the BFF marks them ``serving_unavailable``: the inference server could not be
reached) are left out of both versions' error rates and request counts whenever the champion
met them too in the interval: serving was down, not the candidate. When only the candidate met them,
its own endpoint was unreachable, and they count as its errors. Each check's reasons say how
many were left out. It is ``inconclusive`` when either version has fewer than ``min_requests``
left to judge. Otherwise every metric is compared within its margin and any failure fails the
check. Correction rates (labelers changing a version's pre-fill) are compared over the whole
canary, since feedback is sparse; metrics without enough data are reported and not judged.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from enum import StrEnum
from typing import Final

from pydantic import BaseModel, ConfigDict, Field

from flywheel_rollout.policy import CanaryPolicy

__all__ = [
    "LATENCY_BOUNDS_MS",
    "Analysis",
    "CheckStatus",
    "MetricResult",
    "Window",
    "analyse",
    "quantile",
]

LATENCY_BOUNDS_MS: Final[tuple[float, ...]] = (
    1,
    2,
    3,
    5,
    7.5,
    10,
    15,
    20,
    30,
    50,
    75,
    100,
    150,
    200,
    300,
    500,
    750,
    1000,
    2000,
    5000,
    10000,
)
"""Upper bounds of the latency buckets; one more bucket holds everything slower."""

_EPSILON = 1e-9


class CheckStatus(StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    INCONCLUSIVE = "inconclusive"
    """Too little traffic to judge: counts neither way."""
    OUTAGE = "outage"
    """Both versions failed for want of a dependency: not the candidate's fault."""

    @property
    def counted(self) -> bool:
        return self in (CheckStatus.PASSED, CheckStatus.FAILED)


def _empty_histogram() -> list[int]:
    return [0] * (len(LATENCY_BOUNDS_MS) + 1)


class Window(BaseModel):
    """What one version served in one interval, and the feedback that arrived meanwhile."""

    requests: int = 0
    errors: int = 0
    outage_errors: int = 0
    """Errors whose code says a dependency (Triton, the network) was unavailable."""
    unavailable_errors: int = 0
    """Of those, the requests that never reached a model: the inference server could not be
    reached at all."""
    latency_counts: list[int] = Field(default_factory=_empty_histogram)
    """Answered requests per latency bucket (``LATENCY_BOUNDS_MS``, then overflow)."""
    latency_sum_ms: float = 0.0
    agreements: int = 0
    """Answers of this version on an input the other version answered alike."""
    disagreements: int = 0
    prefilled: int = 0
    """Pre-fills of this version that a labeler answered."""
    corrected: int = 0
    """Of those, the ones the labeler changed."""

    def add_request(
        self,
        *,
        ok: bool,
        latency_ms: float,
        error_code: str | None,
        outage_codes: Sequence[str],
        serving_unavailable: bool = False,
    ) -> None:
        self.requests += 1
        if not ok:
            self.errors += 1
            if serving_unavailable or (error_code is not None and error_code in outage_codes):
                self.outage_errors += 1
            if serving_unavailable:
                self.unavailable_errors += 1
            return
        self.latency_counts[bisect_left(LATENCY_BOUNDS_MS, latency_ms)] += 1
        self.latency_sum_ms += latency_ms

    def add_pair(self, *, agree: bool) -> None:
        if agree:
            self.agreements += 1
        else:
            self.disagreements += 1

    def add_feedback(self, *, corrected: bool) -> None:
        self.prefilled += 1
        if corrected:
            self.corrected += 1

    def merged(self, other: Window) -> Window:
        """Both windows' counts added up."""
        return Window(
            requests=self.requests + other.requests,
            errors=self.errors + other.errors,
            outage_errors=self.outage_errors + other.outage_errors,
            unavailable_errors=self.unavailable_errors + other.unavailable_errors,
            latency_counts=[
                a + b for a, b in zip(self.latency_counts, other.latency_counts, strict=True)
            ],
            latency_sum_ms=self.latency_sum_ms + other.latency_sum_ms,
            agreements=self.agreements + other.agreements,
            disagreements=self.disagreements + other.disagreements,
            prefilled=self.prefilled + other.prefilled,
            corrected=self.corrected + other.corrected,
        )

    def reached(self) -> Window:
        """This window without the requests that never reached a model."""
        left = self.unavailable_errors
        return self.model_copy(
            update={
                "requests": self.requests - left,
                "errors": self.errors - left,
                "outage_errors": self.outage_errors - left,
                "unavailable_errors": 0,
            }
        )

    @property
    def error_rate(self) -> float | None:
        return None if self.requests == 0 else self.errors / self.requests

    @property
    def outage_rate(self) -> float | None:
        return None if self.requests == 0 else self.outage_errors / self.requests

    @property
    def correction_rate(self) -> float | None:
        return None if self.prefilled == 0 else self.corrected / self.prefilled

    def latency(self, q: float) -> float | None:
        return quantile(self.latency_counts, q)


def quantile(counts: Sequence[int], q: float) -> float | None:
    """The ``q``-quantile of a histogram over ``LATENCY_BOUNDS_MS``; None when it is empty.

    Linear within the bucket that holds the rank; a rank in the overflow bucket reads as the
    highest bound (the true value is only known to be above it).
    """
    if not 0 <= q <= 1:
        raise ValueError("q must be within [0, 1]")
    if len(counts) != len(LATENCY_BOUNDS_MS) + 1:
        raise ValueError("histogram does not match the latency buckets")
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    below = 0
    for index, count in enumerate(counts):
        if count and below + count >= rank:
            if index == len(LATENCY_BOUNDS_MS):
                return LATENCY_BOUNDS_MS[-1]
            lower = 0.0 if index == 0 else LATENCY_BOUNDS_MS[index - 1]
            upper = LATENCY_BOUNDS_MS[index]
            return lower + (upper - lower) * (rank - below) / count
        below += count
    return LATENCY_BOUNDS_MS[-1]


class MetricResult(BaseModel):
    """One metric of a check: both values, the limit and whether the candidate stayed within."""

    model_config = ConfigDict(frozen=True)

    name: str
    candidate: float | None
    champion: float | None
    limit: float | None
    passed: bool | None
    """None when there was too little data to judge."""
    reason: str


class Analysis(BaseModel):
    """The outcome of one check, with every number it rests on."""

    model_config = ConfigDict(frozen=True)

    status: CheckStatus
    results: list[MetricResult]
    reasons: list[str]
    metrics: dict[str, float]


def analyse(
    candidate: Window,
    champion: Window,
    candidate_feedback: Window,
    champion_feedback: Window,
    policy: CanaryPolicy,
) -> Analysis:
    """Judge one interval; the feedback windows hold the whole canary's feedback so far."""
    # The champion is the reference: if some of its requests could not reach the inference
    # server, serving was down in this interval, for both versions alike.
    excused = champion.unavailable_errors > 0
    judged = (candidate.reached(), champion.reached()) if excused else (candidate, champion)
    metrics = _metrics(candidate, champion, *judged, candidate_feedback, champion_feedback)
    unavailable = _unavailable(candidate, champion, excused=excused)
    noted = [] if unavailable is None else [unavailable]
    outage = _outage(candidate, champion, policy.outage_share)
    if outage is not None:
        return Analysis(
            status=CheckStatus.OUTAGE, results=[], reasons=[outage, *noted], metrics=metrics
        )
    candidate, champion = judged  # from here on, only what reached a model is judged
    if min(candidate.requests, champion.requests) < policy.min_requests:
        left = "requests left" if excused else "requests"
        reason = (
            f"too little traffic: candidate {candidate.requests}, champion {champion.requests} "
            f"{left} < {policy.min_requests}; not counted"
        )
        return Analysis(
            status=CheckStatus.INCONCLUSIVE, results=[], reasons=[reason, *noted], metrics=metrics
        )
    margins = policy.margins
    results = [
        _at_most(
            "error_rate",
            candidate.error_rate,
            champion.error_rate,
            (champion.error_rate or 0.0) + margins.error_rate,
            f"+ {margins.error_rate:.1%}",
            percent=True,
        ),
        _latency("latency_p95", 0.95, candidate, champion, margins.latency_p95, policy),
        _latency("latency_p99", 0.99, candidate, champion, margins.latency_p99, policy),
        _correction(candidate_feedback, champion_feedback, policy),
        _agreement(candidate, champion, policy),
    ]
    failed = any(result.passed is False for result in results)
    return Analysis(
        status=CheckStatus.FAILED if failed else CheckStatus.PASSED,
        results=results,
        reasons=[*(result.reason for result in results), *noted],
        metrics=metrics,
    )


def _unavailable(candidate: Window, champion: Window, *, excused: bool) -> str | None:
    """What the check did with requests that never reached a model; None when there were none."""
    ours, theirs = candidate.unavailable_errors, champion.unavailable_errors
    if excused:
        return (
            f"serving unavailable: {ours} candidate and {theirs} champion requests never "
            "reached a model (inference server unreachable); left out of the error rates, not "
            "counted against the candidate"
        )
    if ours:
        return (
            f"serving unavailable for the candidate alone: {ours} of its requests never reached "
            "a model while every champion request did; counted as its errors"
        )
    return None


def _outage(candidate: Window, champion: Window, share: float) -> str | None:
    ours, theirs = candidate.outage_rate, champion.outage_rate
    if ours is None or theirs is None or min(ours, theirs) < share:
        return None
    return (
        f"outage: {ours:.0%} of candidate and {theirs:.0%} of champion requests failed "
        "with unavailable-dependency errors; not counted against the candidate"
    )


def _at_most(
    name: str,
    candidate: float | None,
    champion: float | None,
    limit: float,
    margin: str,
    *,
    percent: bool = False,
    unit: str = "",
) -> MetricResult:
    label = name.replace("_", " ")
    if candidate is None or champion is None:
        return MetricResult(
            name=name,
            candidate=candidate,
            champion=champion,
            limit=None,
            passed=None,
            reason=f"{label} not judged: no answered requests",
        )

    def show(value: float) -> str:
        return f"{value:.1%}" if percent else f"{value:.1f}{unit}"

    passed = candidate <= limit + _EPSILON
    reason = (
        f"candidate {label} {show(candidate)} {'<=' if passed else '>'} champion "
        f"{show(champion)} {margin}: {'pass' if passed else 'fail'}"
    )
    return MetricResult(
        name=name, candidate=candidate, champion=champion, limit=limit, passed=passed, reason=reason
    )


def _latency(
    name: str, q: float, candidate: Window, champion: Window, margin: float, policy: CanaryPolicy
) -> MetricResult:
    champion_value = champion.latency(q)
    slack = policy.margins.latency_slack_ms
    limit = (champion_value or 0.0) * (1 + margin) + slack
    return _at_most(
        name,
        candidate.latency(q),
        champion_value,
        limit,
        f"x {1 + margin:.2f} + {slack:g} ms",
        unit=" ms",
    )


def _correction(candidate: Window, champion: Window, policy: CanaryPolicy) -> MetricResult:
    least = min(candidate.prefilled, champion.prefilled)
    if least < policy.min_feedback:
        return MetricResult(
            name="correction_rate",
            candidate=candidate.correction_rate,
            champion=champion.correction_rate,
            limit=None,
            passed=None,
            reason=(
                f"correction rate not judged: {candidate.prefilled} candidate and "
                f"{champion.prefilled} champion pre-fills answered < {policy.min_feedback}"
            ),
        )
    margin = policy.margins.correction_rate
    return _at_most(
        "correction_rate",
        candidate.correction_rate,
        champion.correction_rate,
        (champion.correction_rate or 0.0) + margin,
        f"+ {margin:.1%}",
        percent=True,
    )


def _agreement(candidate: Window, champion: Window, policy: CanaryPolicy) -> MetricResult:
    agreed = candidate.agreements + champion.agreements
    pairs = agreed + candidate.disagreements + champion.disagreements
    rate = None if pairs == 0 else agreed / pairs
    floor = policy.margins.min_agreement
    if pairs < policy.min_pairs or rate is None:
        return MetricResult(
            name="agreement",
            candidate=rate,
            champion=None,
            limit=floor,
            passed=None,
            reason=f"agreement not judged: {pairs} inputs answered by both < {policy.min_pairs}",
        )
    passed = rate + _EPSILON >= floor
    return MetricResult(
        name="agreement",
        candidate=rate,
        champion=None,
        limit=floor,
        passed=passed,
        reason=(
            f"versions agree on {rate:.1%} of {pairs} shared inputs "
            f"{'>=' if passed else '<'} {floor:.1%}: {'pass' if passed else 'fail'}"
        ),
    )


def _metrics(
    candidate: Window,
    champion: Window,
    judged_candidate: Window,
    judged_champion: Window,
    candidate_feedback: Window,
    champion_feedback: Window,
) -> dict[str, float]:
    """Every number of a check: requests and outages as served, error rates as judged."""
    values: dict[str, float | None] = {
        "candidate_requests": candidate.requests,
        "champion_requests": champion.requests,
        "candidate_error_rate": judged_candidate.error_rate,
        "champion_error_rate": judged_champion.error_rate,
        "candidate_outage_rate": candidate.outage_rate,
        "champion_outage_rate": champion.outage_rate,
        "candidate_unavailable_errors": candidate.unavailable_errors,
        "champion_unavailable_errors": champion.unavailable_errors,
        "candidate_p95_ms": candidate.latency(0.95),
        "champion_p95_ms": champion.latency(0.95),
        "candidate_p99_ms": candidate.latency(0.99),
        "champion_p99_ms": champion.latency(0.99),
        "candidate_correction_rate": candidate_feedback.correction_rate,
        "champion_correction_rate": champion_feedback.correction_rate,
        "candidate_prefilled": candidate_feedback.prefilled,
        "champion_prefilled": champion_feedback.prefilled,
    }
    pairs = (
        candidate.agreements
        + candidate.disagreements
        + champion.agreements
        + champion.disagreements
    )
    values["shared_inputs"] = pairs
    if pairs:
        values["agreement"] = (candidate.agreements + champion.agreements) / pairs
    return {name: float(value) for name, value in values.items() if value is not None}
