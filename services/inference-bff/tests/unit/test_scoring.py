import numpy as np
import pytest

from flywheel_inference_bff.scoring import ClassScore, softmax, top_k

LABELS = [str(d) for d in range(10)]


def test_softmax_rows_are_probabilities_in_logit_order() -> None:
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=np.float32)

    probabilities = softmax(logits)

    assert probabilities.sum(axis=1) == pytest.approx([1.0, 1.0])
    expected = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
    assert probabilities[0] == pytest.approx(expected)
    assert probabilities[1] == pytest.approx([1 / 3] * 3)


def test_softmax_does_not_overflow_on_huge_logits() -> None:
    probabilities = softmax(np.array([[1000.0, 999.0, -1000.0]], dtype=np.float32))

    assert np.isfinite(probabilities).all()
    assert probabilities[0, 0] == pytest.approx(1 / (1 + np.exp(-1.0)))
    assert probabilities[0, 2] == pytest.approx(0.0)


def test_softmax_refuses_anything_but_a_matrix() -> None:
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        softmax(np.zeros(10, dtype=np.float32))


def test_top_k_is_best_first_and_keeps_class_order_on_ties() -> None:
    scores = [0.1, 0.3, 0.3, 0.05, 0.25] + [0.0] * 5

    best = top_k(scores, LABELS, 3)

    assert best == [ClassScore("1", 0.3), ClassScore("2", 0.3), ClassScore("4", 0.25)]


def test_top_k_is_capped_by_the_number_of_classes() -> None:
    assert len(top_k([0.5, 0.5], ["a", "b"], 10)) == 2
    assert top_k([0.5, 0.5], ["a", "b"], 0) == []


def test_top_k_refuses_scores_that_do_not_match_the_classes() -> None:
    with pytest.raises(ValueError, match="3 scores for 2 classes"):
        top_k([0.2, 0.3, 0.5], ["a", "b"], 1)
