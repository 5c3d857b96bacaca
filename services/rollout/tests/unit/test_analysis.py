import pytest

from flywheel_rollout.analysis import (
    LATENCY_BOUNDS_MS,
    CheckStatus,
    Window,
    analyse,
    quantile,
)
from flywheel_rollout.policy import CanaryPolicy, Margins

POLICY = CanaryPolicy(
    min_requests=10,
    min_feedback=10,
    min_pairs=10,
    margins=Margins(error_rate=0.01, latency_p95=0.25, latency_p99=0.5, latency_slack_ms=2),
)
OUTAGE = ("dependency_unavailable",)


def window(
    requests: int,
    *,
    errors: int = 0,
    outage: int = 0,
    unreachable: int = 0,
    latency_ms: float = 10.0,
    agree: int = 0,
    disagree: int = 0,
    prefilled: int = 0,
    corrected: int = 0,
) -> Window:
    built = Window()
    for _ in range(unreachable):
        built.add_request(
            ok=False,
            latency_ms=1,
            error_code="inference_unavailable",
            outage_codes=OUTAGE,
            serving_unavailable=True,
        )
    for index in range(requests - unreachable):
        if index < outage:
            built.add_request(
                ok=False, latency_ms=1, error_code="dependency_unavailable", outage_codes=OUTAGE
            )
        elif index < outage + errors:
            built.add_request(ok=False, latency_ms=1, error_code="model_error", outage_codes=OUTAGE)
        else:
            built.add_request(ok=True, latency_ms=latency_ms, error_code=None, outage_codes=OUTAGE)
    for _ in range(agree):
        built.add_pair(agree=True)
    for _ in range(disagree):
        built.add_pair(agree=False)
    for index in range(prefilled):
        built.add_feedback(corrected=index < corrected)
    return built


def test_quantiles_interpolate_linearly_within_the_bucket_holding_the_rank() -> None:
    # 100 answers: 90 in (5, 7.5] ms, 10 in (75, 100] ms.
    counts = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    counts[LATENCY_BOUNDS_MS.index(7.5)] = 90
    counts[LATENCY_BOUNDS_MS.index(100)] = 10

    assert quantile(counts, 0.5) == pytest.approx(5 + 2.5 * 50 / 90)
    assert quantile(counts, 0.9) == pytest.approx(7.5)
    assert quantile(counts, 0.95) == pytest.approx(75 + 25 * 5 / 10)
    assert quantile(counts, 0.99) == pytest.approx(75 + 25 * 9 / 10)
    assert quantile(counts, 1.0) == pytest.approx(100)


def test_the_first_bucket_starts_at_zero_and_the_overflow_reads_as_the_highest_bound() -> None:
    first = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    first[0] = 4
    overflow = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    overflow[-1] = 3

    assert quantile(first, 0.5) == pytest.approx(0.5)
    assert quantile(overflow, 0.99) == LATENCY_BOUNDS_MS[-1]
    assert quantile([0] * (len(LATENCY_BOUNDS_MS) + 1), 0.95) is None


def test_quantile_refuses_a_histogram_of_other_buckets() -> None:
    with pytest.raises(ValueError, match="buckets"):
        quantile([1, 2, 3], 0.5)
    with pytest.raises(ValueError, match="within"):
        quantile([0] * (len(LATENCY_BOUNDS_MS) + 1), 1.5)


def test_a_window_counts_errors_outages_latency_agreement_and_feedback() -> None:
    built = window(
        20, errors=3, outage=2, latency_ms=12, agree=4, disagree=1, prefilled=8, corrected=2
    )

    assert (built.requests, built.errors, built.outage_errors) == (20, 5, 2)
    assert built.error_rate == pytest.approx(0.25)
    assert built.outage_rate == pytest.approx(0.1)
    assert sum(built.latency_counts) == 15
    assert built.latency_sum_ms == pytest.approx(15 * 12)
    assert 10 < (built.latency(0.95) or 0) <= 15
    assert built.correction_rate == pytest.approx(0.25)
    merged = built.merged(window(10, prefilled=2, corrected=2))
    assert (merged.requests, merged.prefilled, merged.corrected) == (30, 10, 4)
    assert sum(merged.latency_counts) == 25
    assert Window().error_rate is None
    assert Window().correction_rate is None


def test_a_candidate_like_the_champion_passes_every_judged_metric() -> None:
    result = analyse(window(50), window(200), window(0), window(0), POLICY)

    assert result.status is CheckStatus.PASSED
    passed = {r.name: r.passed for r in result.results}
    assert passed == {
        "error_rate": True,
        "latency_p95": True,
        "latency_p99": True,
        "correction_rate": None,
        "agreement": None,
    }
    assert result.reasons[0] == "candidate error rate 0.0% <= champion 0.0% + 1.0%: pass"
    assert result.metrics["candidate_requests"] == 50
    assert result.metrics["champion_requests"] == 200
    assert "agreement" not in result.metrics


def test_a_higher_error_rate_fails_the_check_with_both_numbers() -> None:
    result = analyse(window(50, errors=5), window(200, errors=2), window(0), window(0), POLICY)

    assert result.status is CheckStatus.FAILED
    error = result.results[0]
    assert (error.passed, error.candidate, error.champion) == (False, 0.1, 0.01)
    assert error.limit == pytest.approx(0.02)
    assert error.reason == "candidate error rate 10.0% > champion 1.0% + 1.0%: fail"


def test_slower_answers_fail_the_latency_percentiles_beyond_margin_and_slack() -> None:
    slow = analyse(window(50, latency_ms=40), window(50, latency_ms=10), Window(), Window(), POLICY)
    within_slack = analyse(
        window(50, latency_ms=9.5), window(50, latency_ms=7), Window(), Window(), POLICY
    )

    failed = {r.name for r in slow.results if r.passed is False}
    assert failed == {"latency_p95", "latency_p99"}
    assert slow.metrics["candidate_p95_ms"] > slow.metrics["champion_p95_ms"]
    assert "x 1.25 + 2 ms: fail" in slow.reasons[1]
    assert within_slack.status is CheckStatus.PASSED


def test_correction_rates_are_compared_once_both_versions_have_enough_feedback() -> None:
    worse = analyse(
        window(50),
        window(50),
        window(0, prefilled=20, corrected=8),
        window(0, prefilled=20, corrected=1),
        POLICY,
    )
    too_few = analyse(
        window(50), window(50), window(0, prefilled=9, corrected=9), window(0, prefilled=40), POLICY
    )

    correction = worse.results[3]
    assert correction.passed is False
    assert (correction.candidate, correction.champion) == (0.4, 0.05)
    assert correction.reason == "candidate correction rate 40.0% > champion 5.0% + 5.0%: fail"
    assert too_few.results[3].passed is None
    assert too_few.results[3].reason == (
        "correction rate not judged: 9 candidate and 40 champion pre-fills answered < 10"
    )
    assert too_few.status is CheckStatus.PASSED


def test_agreement_on_shared_inputs_is_judged_against_its_floor() -> None:
    agreeing = analyse(window(50, agree=9), window(50, agree=3), Window(), Window(), POLICY)
    disagreeing = analyse(
        window(50, agree=4, disagree=4), window(50, agree=2), Window(), Window(), POLICY
    )
    sparse = analyse(window(50, disagree=3), window(50), Window(), Window(), POLICY)

    assert agreeing.results[4].passed is True
    assert agreeing.metrics["agreement"] == 1.0
    assert disagreeing.status is CheckStatus.FAILED
    assert (
        disagreeing.results[4].reason == "versions agree on 60.0% of 10 shared inputs < 90.0%: fail"
    )
    assert sparse.results[4].passed is None
    assert sparse.metrics["shared_inputs"] == 3


def test_too_little_traffic_on_either_version_is_inconclusive() -> None:
    result = analyse(window(9, errors=9), window(500), Window(), Window(), POLICY)

    assert result.status is CheckStatus.INCONCLUSIVE
    assert not result.status.counted
    assert result.results == []
    assert result.reasons == [
        "too little traffic: candidate 9, champion 500 requests < 10; not counted"
    ]


def test_most_requests_of_both_versions_failing_for_a_dependency_is_an_outage() -> None:
    result = analyse(window(40, outage=30), window(80, outage=70), Window(), Window(), POLICY)

    assert result.status is CheckStatus.OUTAGE
    assert not result.status.counted
    assert result.reasons == [
        "outage: 75% of candidate and 88% of champion requests failed with "
        "unavailable-dependency errors; not counted against the candidate"
    ]
    assert result.metrics["candidate_outage_rate"] == 0.75


def test_dependency_errors_of_the_candidate_alone_are_its_own_fault() -> None:
    result = analyse(window(40, outage=30), window(80), Window(), Window(), POLICY)

    assert result.status is CheckStatus.FAILED
    assert result.results[0].passed is False


def test_a_window_counts_requests_that_never_reached_a_model_as_outage_errors() -> None:
    built = window(10, errors=1, unreachable=4)

    assert (built.requests, built.errors, built.outage_errors) == (10, 5, 4)
    assert built.unavailable_errors == 4
    reached = built.reached()
    assert (reached.requests, reached.errors, reached.outage_errors) == (6, 1, 0)
    assert reached.unavailable_errors == 0
    assert built.merged(window(3, unreachable=2)).unavailable_errors == 6


def test_requests_both_versions_could_not_get_to_the_server_are_left_out_and_said_so() -> None:
    # Triton went away mid-interval: 8 of the candidate's 20 requests and 60 of the champion's
    # 200 never reached a model. Counted as errors, that is 40 % against 30 %: a failed check.
    candidate, champion = window(20, unreachable=8), window(200, unreachable=60)

    result = analyse(candidate, champion, Window(), Window(), POLICY)

    assert result.status is CheckStatus.PASSED
    assert result.results[0].name == "error_rate"
    assert (result.results[0].candidate, result.results[0].champion) == (0.0, 0.0)
    assert result.reasons[-1] == (
        "serving unavailable: 8 candidate and 60 champion requests never reached a model "
        "(inference server unreachable); left out of the error rates, not counted against "
        "the candidate"
    )
    assert result.metrics["candidate_unavailable_errors"] == 8
    assert result.metrics["champion_unavailable_errors"] == 60
    assert result.metrics["candidate_requests"] == 20
    assert result.metrics["candidate_error_rate"] == 0.0


def test_model_errors_are_still_judged_beside_requests_that_never_reached_a_model() -> None:
    candidate = window(40, errors=6, unreachable=10)
    champion = window(300, unreachable=100)

    result = analyse(candidate, champion, Window(), Window(), POLICY)

    assert result.status is CheckStatus.FAILED
    assert result.results[0].candidate == pytest.approx(6 / 30)
    assert result.results[0].reason == "candidate error rate 20.0% > champion 0.0% + 1.0%: fail"


def test_the_champion_meeting_an_unreachable_server_alone_does_not_mask_the_candidate() -> None:
    # Counted, the champion's 40 % would hide the candidate's 10 % model errors.
    result = analyse(window(50, errors=5), window(100, unreachable=40), Window(), Window(), POLICY)

    assert result.status is CheckStatus.FAILED
    assert (result.results[0].candidate, result.results[0].champion) == (0.1, 0.0)
    assert result.reasons[-1].startswith("serving unavailable: 0 candidate and 40 champion")


def test_an_unreachable_server_for_the_candidate_alone_is_its_own_fault_and_said_so() -> None:
    result = analyse(window(40, unreachable=10), window(200), Window(), Window(), POLICY)

    assert result.status is CheckStatus.FAILED
    assert result.results[0].candidate == 0.25
    assert result.reasons[-1] == (
        "serving unavailable for the candidate alone: 10 of its requests never reached a model "
        "while every champion request did; counted as its errors"
    )


def test_too_little_left_once_unreachable_requests_are_left_out_is_inconclusive() -> None:
    result = analyse(
        window(12, unreachable=5), window(100, unreachable=40), Window(), Window(), POLICY
    )

    assert result.status is CheckStatus.INCONCLUSIVE
    assert not result.status.counted
    assert result.reasons == [
        "too little traffic: candidate 7, champion 60 requests left < 10; not counted",
        "serving unavailable: 5 candidate and 40 champion requests never reached a model "
        "(inference server unreachable); left out of the error rates, not counted against "
        "the candidate",
    ]


def test_an_interval_the_server_was_unreachable_throughout_is_an_outage_with_its_counts() -> None:
    result = analyse(
        window(12, unreachable=12), window(90, unreachable=88), Window(), Window(), POLICY
    )

    assert result.status is CheckStatus.OUTAGE
    assert not result.status.counted
    assert result.reasons[0].startswith("outage: 100% of candidate and 98% of champion")
    assert result.reasons[1].startswith("serving unavailable: 12 candidate and 88 champion")
    assert "candidate_error_rate" not in result.metrics  # nothing reached the candidate
    assert result.metrics["champion_error_rate"] == 0.0
