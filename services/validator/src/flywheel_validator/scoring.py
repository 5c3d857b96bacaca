"""Scoring a model by class NAME, whatever order its outputs are in.

Each model carries its own ``labels.json``: output ``i`` means ``classes[i]``. A champion trained
when the project had other classes, or with them in another order, is therefore scored by
mapping each test image's class name to that model's own index. Test images of a class the
model does not know can never be predicted right: they count as errors, and that class's recall
is zero.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from flywheel_validator.gates import ModelScore
from flywheel_validator.ports import LabeledImage
from flywheel_vision.evaluate import Evaluation

__all__ = ["by_class_name", "score"]


def by_class_name(
    images: Sequence[LabeledImage], classes: Sequence[str]
) -> tuple[list[tuple[bytes, int]], Counter[str]]:
    """``(image, index in classes)`` for images of known classes, and counts of the others."""
    index = {name: position for position, name in enumerate(classes)}
    if len(index) != len(classes):
        raise ValueError("labels.json names a class twice")
    known: list[tuple[bytes, int]] = []
    unknown: Counter[str] = Counter()
    for image in images:
        position = index.get(image.class_name)
        if position is None:
            unknown[image.class_name] += 1
        else:
            known.append((image.data, position))
    return known, unknown


def score(evaluation: Evaluation, unknown: Counter[str]) -> ModelScore:
    """The model's score over the whole test split, unknown-class images counted as errors.

    Accuracy and recall are exact. Macro-F1 adds an F1 of zero for each unknown class; the
    known classes keep the F1 measured without the unknown images, an upper bound since those
    images' predictions would only have added false positives to them.
    """
    unknown_total = sum(unknown.values())
    total = evaluation.num_images + unknown_total
    if not unknown_total:
        accuracy, macro_f1 = evaluation.accuracy, evaluation.macro_f1
    else:
        accuracy = evaluation.accuracy * evaluation.num_images / total
        present = _classes_present(evaluation.confusion)
        macro_f1 = evaluation.macro_f1 * present / (present + len(unknown))
    recall = dict(evaluation.per_class_recall) | dict.fromkeys(sorted(unknown), 0.0)
    return ModelScore(
        test_images=total,
        accuracy=accuracy,
        macro_f1=macro_f1,
        per_class_recall=dict(sorted(recall.items())),
        latency_p50_ms=evaluation.latency_p50_ms,
        latency_p95_ms=evaluation.latency_p95_ms,
        model_size_bytes=evaluation.model_size_bytes,
        unknown_class_images=unknown_total,
        unknown_classes=sorted(unknown),
    )


def _classes_present(confusion: list[list[int]]) -> int:
    """Classes with at least one label or prediction: those macro-F1 averaged over."""
    size = len(confusion)
    return sum(
        1
        for i in range(size)
        if sum(confusion[i]) + sum(confusion[row][i] for row in range(size)) > 0
    )
