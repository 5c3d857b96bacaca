from collections import Counter

import pytest

from flywheel_validator.ports import LabeledImage
from flywheel_validator.scoring import by_class_name, score
from flywheel_vision.evaluate import Evaluation


def _images(*names: str) -> list[LabeledImage]:
    return [LabeledImage(class_name=n, data=f"{n}-{i}".encode()) for i, n in enumerate(names)]


def test_images_get_each_models_own_index_for_their_class_name() -> None:
    images = _images("cat", "dog", "dog", "bird")

    forward, _ = by_class_name(images, ["bird", "cat", "dog"])
    reversed_, _ = by_class_name(images, ["dog", "cat", "bird"])

    assert [label for _, label in forward] == [1, 2, 2, 0]
    assert [label for _, label in reversed_] == [1, 0, 0, 2]
    assert [data for data, _ in forward] == [i.data for i in images]


def test_images_of_classes_the_model_does_not_know_are_counted_apart() -> None:
    known, unknown = by_class_name(_images("cat", "fox", "dog", "fox", "owl"), ["cat", "dog"])

    assert [label for _, label in known] == [0, 1]
    assert unknown == Counter({"fox": 2, "owl": 1})


def test_labels_naming_a_class_twice_are_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        by_class_name(_images("cat"), ["cat", "cat"])


def _evaluation(**overrides: object) -> Evaluation:
    values: dict[str, object] = {
        "num_images": 8,
        "accuracy": 0.75,
        "macro_f1": 0.8,
        "per_class_recall": {"cat": 0.5, "dog": 1.0},
        "confusion": [[2, 2], [0, 4]],
        "latency_p50_ms": 0.4,
        "latency_p95_ms": 0.9,
        "model_size_bytes": 1234,
    }
    return Evaluation.model_validate(values | overrides)


def test_without_unknown_classes_the_evaluation_is_taken_as_is() -> None:
    scored = score(_evaluation(), Counter())

    assert (scored.test_images, scored.accuracy, scored.macro_f1) == (8, 0.75, 0.8)
    assert scored.per_class_recall == {"cat": 0.5, "dog": 1.0}
    assert (scored.latency_p95_ms, scored.model_size_bytes) == (0.9, 1234)
    assert scored.unknown_class_images == 0


def test_unknown_class_images_count_as_errors_with_zero_recall() -> None:
    scored = score(_evaluation(), Counter({"fox": 2}))

    assert scored.test_images == 10
    assert scored.accuracy == pytest.approx(6 / 10)
    assert scored.macro_f1 == pytest.approx(0.8 * 2 / 3)
    assert scored.per_class_recall == {"cat": 0.5, "dog": 1.0, "fox": 0.0}
    assert (scored.unknown_class_images, scored.unknown_classes) == (2, ["fox"])
