import numpy as np
import numpy.typing as npt
import pytest

from flywheel_data_monitor.drift import (
    DriftThresholds,
    classes_test,
    embedding_test,
    population_stability_index,
    statistic_test,
)

THRESHOLDS = DriftThresholds()
DIGITS = [str(d) for d in range(10)]


def _embeddings(rng: np.random.Generator, n: int, shift: float = 0.0) -> npt.NDArray[np.float64]:
    base = rng.normal(size=(n, 16))
    base[:, :4] += shift
    return base


@pytest.mark.parametrize("seed", range(5))
def test_embeddings_from_one_distribution_do_not_drift(seed: int) -> None:
    rng = np.random.default_rng(seed)
    result = embedding_test(_embeddings(rng, 600), _embeddings(rng, 400), THRESHOLDS)

    assert result.judged
    assert not result.drifted, result
    assert result.effect is not None
    assert result.effect < THRESHOLDS.min_auc


def test_shifted_embeddings_drift_with_auc_and_p_value() -> None:
    rng = np.random.default_rng(1)
    result = embedding_test(_embeddings(rng, 600), _embeddings(rng, 400, shift=1.0), THRESHOLDS)

    assert result.drifted
    assert result.effect is not None
    assert result.effect > 0.8
    assert result.p_value is not None
    assert result.p_value < 1e-6
    assert (result.reference_samples, result.current_samples) == (600, 400)


def test_too_few_samples_are_not_judged() -> None:
    rng = np.random.default_rng(2)
    result = embedding_test(_embeddings(rng, 600), _embeddings(rng, 50, shift=3.0), THRESHOLDS)

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
