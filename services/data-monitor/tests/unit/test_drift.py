from datetime import UTC, datetime, timedelta

import numpy as np
import numpy.typing as npt
import pytest

from flywheel_contracts.events import DriftAction
from flywheel_data_monitor.drift import (
    DriftThresholds,
    Features,
    LabelCandidate,
    choose_action,
    classes_test,
    embedding_test,
    evaluate,
    most_drifted,
    population_stability_index,
    statistic_test,
)
from flywheel_data_monitor.plots import plot_test

THRESHOLDS = DriftThresholds()
DIGITS = [str(d) for d in range(10)]


def _embeddings(rng: np.random.Generator, n: int, shift: float = 0.0) -> npt.NDArray[np.float64]:
    base = rng.normal(size=(n, 16))
    base[:, :4] += shift
    return base


@pytest.mark.parametrize("seed", range(5))
def test_embeddings_from_one_distribution_do_not_drift(seed: int) -> None:
    rng = np.random.default_rng(seed)
    result = embedding_test(_embeddings(rng, 600), _embeddings(rng, 400), THRESHOLDS).test

    assert result.judged
    assert not result.drifted, result
    assert result.effect is not None
    assert result.effect < THRESHOLDS.min_auc


def test_shifted_embeddings_drift_with_auc_and_p_value() -> None:
    rng = np.random.default_rng(1)
    result = embedding_test(
        _embeddings(rng, 600), _embeddings(rng, 400, shift=1.0), THRESHOLDS
    ).test

    assert result.drifted
    assert result.effect is not None
    assert result.effect > 0.8
    assert result.p_value is not None
    assert result.p_value < 1e-6
    assert (result.reference_samples, result.current_samples) == (600, 400)


def test_too_few_samples_are_not_judged() -> None:
    rng = np.random.default_rng(2)
    result = embedding_test(_embeddings(rng, 600), _embeddings(rng, 50, shift=3.0), THRESHOLDS).test

    assert not result.judged
    assert not result.drifted
    assert result.current_samples == 50


def test_a_significant_but_negligible_shift_is_not_drift() -> None:
    rng = np.random.default_rng(3)
    reference = rng.normal(0.5, 0.1, size=2000)
    current = rng.normal(0.51, 0.1, size=2000)

    result = statistic_test("brightness", reference, current, THRESHOLDS)

    assert result.judged
    assert result.effect is not None
    assert result.effect < THRESHOLDS.min_psi
    assert not result.drifted


def test_an_inverted_brightness_drifts() -> None:
    rng = np.random.default_rng(4)
    reference = rng.normal(0.13, 0.03, size=1000)
    current = 1 - rng.normal(0.13, 0.03, size=300)

    result = statistic_test("brightness", reference, current, THRESHOLDS)

    assert result.drifted
    assert result.statistic == pytest.approx(1.0)
    assert result.details["current_mean"] > 0.8


def test_psi_is_zero_for_equal_samples_and_grows_with_the_shift() -> None:
    rng = np.random.default_rng(5)
    reference = rng.normal(size=5000)

    same = population_stability_index(reference, reference)
    small = population_stability_index(reference, reference + 0.1)
    large = population_stability_index(reference, reference + 1.0)

    assert same == pytest.approx(0.0, abs=1e-9)
    assert 0 < small < 0.1 < THRESHOLDS.min_psi < large


def test_psi_of_a_constant_reference_is_finite() -> None:
    assert np.isfinite(population_stability_index(np.zeros(100), np.ones(100)))


def test_predicted_classes_drift_when_one_class_takes_over() -> None:
    reference = dict.fromkeys(DIGITS, 100)
    current = dict.fromkeys(DIGITS, 20) | {"8": 400}

    result = classes_test(reference, current, THRESHOLDS)

    assert result.drifted
    assert result.effect is not None
    assert result.effect > 0.5
    assert result.details["current_shares"]["8"] > 0.6


@pytest.mark.parametrize("seed", range(5))
def test_predicted_classes_sampled_from_the_reference_mix_do_not_drift(seed: int) -> None:
    rng = np.random.default_rng(seed)
    reference = dict.fromkeys(DIGITS, 500)
    drawn = rng.choice(DIGITS, size=400)
    current = {d: int((drawn == d).sum()) for d in DIGITS}

    result = classes_test(reference, current, THRESHOLDS)

    assert result.judged
    assert not result.drifted, result


def test_classes_on_one_side_only_are_counted() -> None:
    result = classes_test({"0": 300}, {"0": 150, "1": 150}, THRESHOLDS)

    assert result.drifted
    assert result.effect == pytest.approx(0.5)


def _features(rng: np.random.Generator, n: int, *, inverted: int = 0) -> Features:
    """``n`` digit-like rows, the last ``inverted`` of them bright and shifted."""
    embeddings = _embeddings(rng, n)
    brightness = rng.normal(0.13, 0.03, size=n)
    embeddings[n - inverted :, :4] += 2.0
    brightness[n - inverted :] = 1 - brightness[n - inverted :]
    predicted = [DIGITS[i % 10] for i in range(n)]
    inputs = [(f"{i:064x}", f"inputs/digits/{i:064x}.png") for i in range(n)]
    return Features(
        embeddings=embeddings,
        statistics={"brightness": brightness, "width": np.full(n, 28.0)},
        predicted=predicted,
        confidences=[0.9] * n,
        inputs=inputs,
    )


def _evaluate(reference: Features, window: Features):  # type: ignore[no-untyped-def]
    now = datetime.now(UTC)
    return evaluate(
        reference,
        window,
        THRESHOLDS,
        project_id="digits",
        model_line="digits-classifier",
        model_version="3",
        window_start=now - timedelta(hours=1),
        window_end=now,
    )


def test_a_window_like_the_reference_reports_every_test_and_no_drift() -> None:
    rng = np.random.default_rng(7)
    evaluation = _evaluate(_features(rng, 800), _features(rng, 400))

    report = evaluation.report
    assert [(t.kind, t.feature) for t in report.tests] == [
        ("embedding", "embedding"),
        ("statistic", "brightness"),
        ("statistic", "width"),
        ("classes", "predicted_class"),
    ]
    assert all(t.judged for t in report.tests)
    assert not report.drifted
    assert report.reasons() == []
    assert (report.samples, report.reference_samples) == (400, 800)


def test_a_drifted_window_names_its_tests_and_ranks_the_drifted_images_first() -> None:
    rng = np.random.default_rng(8)
    window = _features(rng, 400, inverted=200)
    evaluation = _evaluate(_features(rng, 800), window)

    report = evaluation.report
    assert report.drifted
    drifted = {t.feature for t in report.tests if t.drifted}
    assert {"embedding", "brightness"} <= drifted
    assert "width" not in drifted
    assert any(line.startswith("embedding: domain classifier AUC") for line in report.reasons())
    top = most_drifted(window, evaluation.scores, limit=20)
    assert len(top) == 20
    assert all(int(c.input_sha256, 16) >= 200 for c in top), "the shifted half comes first"
    assert [c.score for c in top] == sorted((c.score for c in top), reverse=True)


def test_a_partly_drifted_window_asks_labels_for_its_drifted_images_alone() -> None:
    # A check that straddles the start of a drift: 60 drifted images among 340 as trained.
    rng = np.random.default_rng(9)
    window = _features(rng, 400, inverted=60)
    evaluation = _evaluate(_features(rng, 800), window)
    assert evaluation.report.drifted

    top = most_drifted(window, evaluation.scores, limit=100, above=evaluation.cut)
    everything = most_drifted(window, evaluation.scores, limit=100)

    def training_like(candidates: list[LabelCandidate]) -> int:
        return sum(int(c.input_sha256, 16) < 340 for c in candidates)

    assert len(top) - training_like(top) >= 40, [c.score for c in top]
    assert training_like(top) <= 3, "training-like images stay out of the request"
    assert all(c.score > evaluation.cut for c in top)
    assert training_like(everything) >= 40  # without the cut they fill the limit
    [embedding] = [t for t in evaluation.report.tests if t.feature == "embedding"]
    assert embedding.details["label_score_cut"] == evaluation.cut


def test_most_drifted_skips_images_that_were_not_stored_and_repeats() -> None:
    window = Features(
        embeddings=None,
        statistics={},
        predicted=["1", "2", "3"],
        confidences=[0.5, 0.6, 0.7],
        inputs=[("a" * 64, None), ("b" * 64, "inputs/b.png"), ("b" * 64, "inputs/b.png")],
    )

    top = most_drifted(window, {0: 0.99, 1: 0.9, 2: 0.95}, limit=5)

    assert [(c.input_sha256, c.score, c.predicted_class) for c in top] == [("b" * 64, 0.95, "3")]


@pytest.mark.parametrize(
    ("fresh", "candidates", "pending", "action"),
    [
        (500, 0, False, DriftAction.RETRAIN),
        (10, 20, False, DriftAction.LABELS_REQUESTED),
        (10, 20, True, DriftAction.ALERT),
        (10, 0, False, DriftAction.ALERT),
    ],
)
def test_retrain_needs_fresh_labels_else_labels_are_requested(
    fresh: int, candidates: int, pending: bool, action: DriftAction
) -> None:
    assert (
        choose_action(
            fresh_labels=fresh, min_fresh_labels=100, candidates=candidates, request_pending=pending
        )
        == action
    )


def test_every_test_of_a_report_draws_a_png() -> None:
    rng = np.random.default_rng(9)
    reference, window = _features(rng, 400), _features(rng, 300, inverted=100)
    evaluation = _evaluate(reference, window)

    for test in evaluation.report.tests:
        png = plot_test(test, reference, window, evaluation.scores)
        assert png.startswith(b"\x89PNG\r\n\x1a\n"), test.feature


def test_inferences_without_an_embedding_are_left_out_of_the_embedding_test() -> None:
    rng = np.random.default_rng(10)
    current = _embeddings(rng, 300, shift=1.0)
    current[::3] = np.nan  # a third logged while the served config had no embedding output

    drift = embedding_test(_embeddings(rng, 600), current, THRESHOLDS)

    assert drift.test.judged
    assert drift.test.current_samples == 200
    assert drift.test.drifted
    assert not any(row % 3 == 0 for row in drift.current_rows)


def test_a_reference_too_small_is_not_judged() -> None:
    rng = np.random.default_rng(11)
    small = DriftThresholds(min_reference_samples=500)

    assert not embedding_test(_embeddings(rng, 400), _embeddings(rng, 400), small).test.judged
    assert not statistic_test("width", np.ones(400), np.ones(400), small).judged


def test_classes_too_rare_for_chi_square_are_pooled_so_a_small_reference_raises_no_alarm() -> None:
    # 40 reference predictions over ten classes: expected counts under 5 everywhere.
    reference = {"0": 9, "1": 2, "2": 6, "3": 1, "4": 7, "5": 3, "6": 5, "7": 2, "8": 4, "9": 1}
    current = dict.fromkeys(DIGITS, 12)

    small = DriftThresholds(min_samples=100, min_reference_samples=30)

    result = classes_test(reference, current, small)

    assert result.judged
    assert not result.drifted, result
