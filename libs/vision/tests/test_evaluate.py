from pathlib import Path

import numpy as np
import pytest
import torch

from flywheel_vision.data import load_mnist, to_png
from flywheel_vision.evaluate import evaluate, metrics_from_predictions
from flywheel_vision.export import export_onnx
from flywheel_vision.model import DigitNet


def _always(predicted: int, num_classes: int = 10) -> bytes:
    """An exported model that answers ``predicted`` whatever the image."""
    model = DigitNet(num_classes)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(predicted), num_classes))
    return export_onnx(model)


@pytest.fixture(scope="module")
def always_one() -> bytes:
    return _always(1)


def _samples(count: int) -> list[tuple[bytes, int]]:
    images, labels = load_mnist("test", count)
    return [(to_png(image), int(label)) for image, label in zip(images, labels, strict=True)]


def test_a_constant_model_is_right_exactly_on_its_class(always_one: bytes) -> None:
    samples = _samples(40)
    ones = sum(1 for _, label in samples if label == 1)

    result = evaluate(always_one, samples)

    assert result.num_images == 40
    assert result.accuracy == pytest.approx(ones / 40)
    assert result.per_class_recall["1"] == 1.0
    assert all(v == 0.0 for k, v in result.per_class_recall.items() if k != "1")
    assert sum(map(sum, result.confusion)) == 40
    assert result.model_size_bytes == len(always_one)
    assert 0 < result.latency_p50_ms <= result.latency_p95_ms


def test_a_model_file_path_and_class_names_are_accepted(always_one: bytes, tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(always_one)
    names = [f"digit-{i}" for i in range(10)]

    result = evaluate(path, _samples(10), classes=names, latency_images=0)

    assert set(result.per_class_recall) <= set(names)
    assert result.per_class_recall["digit-1"] == 1.0
    assert result.latency_p50_ms == 0.0


def test_labels_outside_the_model_outputs_are_refused(always_one: bytes) -> None:
    png = _samples(1)[0][0]

    with pytest.raises(ValueError, match="labels"):
        evaluate(always_one, [(png, 10)])
    with pytest.raises(ValueError, match="classes"):
        evaluate(always_one, [(png, 0)], classes=["a", "b"])


def test_metrics_match_a_hand_computed_example() -> None:
    labels = np.array([0, 0, 1, 1, 2], dtype=np.int64)
    predictions = np.array([0, 1, 1, 1, 0], dtype=np.int64)

    accuracy, macro_f1, recall, confusion = metrics_from_predictions(labels, predictions, 4)

    assert accuracy == pytest.approx(3 / 5)
    # F1 per class: 0 → 2·1/(2+2)=0.5, 1 → 2·2/(2+3)=0.8, 2 → 0; class 3 is absent.
    assert macro_f1 == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert recall == {0: 0.5, 1: 1.0, 2: 0.0}
    assert confusion[0] == [1, 1, 0, 0]
