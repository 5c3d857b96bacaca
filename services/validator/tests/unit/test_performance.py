import pytest

from flywheel_serving.tuning import LoadPoint
from flywheel_validator.performance import (
    PerformanceGate,
    check_performance,
    headline,
    per_level,
)

GATE = PerformanceGate(throughput_margin=0.2, p99_margin=0.5, p99_slack_ms=2.0)


def point(
    concurrency: int, rps: float, p99: float, *, errors: int = 0, requests: int = 100
) -> LoadPoint:
    return LoadPoint(
        concurrency=concurrency,
        requests=requests,
        errors=errors,
        throughput_rps=rps,
        p50_ms=p99 / 2,
        p95_ms=p99 * 0.9,
        p99_ms=p99,
    )


CHAMPION = [
    point(1, 200, 6),
    point(4, 410, 20),
    point(1, 190, 5),
    point(4, 420, 18),
    point(4, 380, 24),
]


def test_each_level_takes_the_median_of_its_rounds() -> None:
    levels = per_level(
        [point(4, 300, 30), point(1, 100, 9), point(4, 350, 40, errors=1), point(4, 900, 20)]
    )

    assert list(levels) == [1, 4]
    four = levels[4]
    assert (four.throughput_rps, four.p99_ms, four.requests, four.errors) == (350, 30, 300, 1)


def test_the_headline_skips_levels_with_errors_or_over_the_p99_limit() -> None:
    levels = per_level([point(1, 100, 5), point(4, 300, 30), point(8, 500, 60, errors=2)])

    best = headline(levels, None)
    limited = headline(levels, 10.0)

    assert best is not None
    assert best.concurrency == 4
    assert limited is not None
    assert limited.concurrency == 1
    assert headline(levels, 1.0) is None


def test_a_same_speed_candidate_passes() -> None:
    candidate = [point(1, 195, 6), point(4, 400, 21), point(4, 390, 22), point(4, 405, 19)]

    outcome = check_performance(GATE, candidate, CHAMPION)

    assert outcome.result.passed
    assert outcome.result.reason == (
        "performance: throughput candidate 400 rps vs champion 410 rps (-2% within -20% "
        "margin); p99 at concurrency 4 candidate 21.0 ms vs champion 20.0 ms (+5% within +50% "
        "margin + 2 ms): pass"
    )
    assert outcome.candidate_metrics == {
        "serving_rps": 400,
        "serving_requests": 400,
        "serving_errors": 0,
        "serving_concurrency": 4,
        "serving_p99_ms": 21.0,
    }
    assert outcome.champion_metrics["serving_rps"] == 410
    assert outcome.champion_metrics["serving_p99_ms"] == 20.0


def test_a_slower_candidate_fails_with_its_figures() -> None:
    candidate = [point(1, 90, 14), point(4, 180, 42), point(4, 170, 45), point(4, 190, 40)]

    outcome = check_performance(GATE, candidate, CHAMPION)

    assert not outcome.result.passed
    assert outcome.result.reason == (
        "performance: throughput candidate 180 rps vs champion 410 rps (-56% beyond -20% "
        "margin); p99 at concurrency 4 candidate 42.0 ms vs champion 20.0 ms (+110% beyond "
        "+50% margin + 2 ms): fail"
    )
    assert outcome.candidate_metrics["serving_rps"] == 180
    assert outcome.champion_metrics["serving_rps"] == 410


@pytest.mark.parametrize(
    ("rps", "p99", "passed"),
    [
        (328, 20, True),  # exactly -20 %
        (327, 20, False),
        (410, 32, True),  # exactly 20 * 1.5 + 2 ms
        (410, 32.1, False),
    ],
)
def test_margins_are_inclusive(rps: float, p99: float, passed: bool) -> None:
    outcome = check_performance(GATE, [point(1, 200, 6), point(4, rps, p99)], CHAMPION)

    assert outcome.result.passed is passed, outcome.result.reason


def test_p99_is_compared_at_the_champions_level_not_the_candidates_best() -> None:
    # The candidate peaks at 8 in flight with a long queue; at the champion's 4 it is as quick.
    champion = [point(4, 400, 20), point(8, 390, 40)]
    candidate = [point(4, 395, 21), point(8, 420, 80)]

    outcome = check_performance(GATE, candidate, champion)

    assert outcome.result.passed, outcome.result.reason
    assert outcome.candidate_metrics["serving_concurrency"] == 8
    assert outcome.candidate_metrics["serving_p99_ms"] == 21


def test_a_candidate_that_fails_requests_at_every_level_fails() -> None:
    candidate = [point(1, 200, 6, errors=3), point(4, 400, 20, errors=100)]

    outcome = check_performance(GATE, candidate, CHAMPION)

    assert not outcome.result.passed
    assert outcome.result.reason == (
        "performance: candidate served no level without errors vs champion 410 rps at "
        "concurrency 4 (103 of 200 requests failed): fail"
    )
    assert outcome.candidate_metrics["serving_rps"] == 0
    assert outcome.candidate_metrics["serving_errors"] == 103


def test_a_champion_without_an_eligible_level_is_not_compared() -> None:
    limited = GATE.model_copy(update={"max_p99_ms": 3.0})

    outcome = check_performance(limited, CHAMPION, CHAMPION)

    assert outcome.result.passed
    assert outcome.result.reason == (
        "performance not compared (the champion served no level without errors and "
        "p99 <= 3 ms): skipped"
    )
