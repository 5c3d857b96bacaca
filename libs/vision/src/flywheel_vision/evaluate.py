"""Offline evaluation of an exported model, the way serving will run it.

The validator compares a candidate with the champion on the same held-out images. Both are
judged as deployed: the ONNX file on onnxruntime, fed through ``preprocess`` with the
preprocessing each declared, so an export or preprocessing fault shows up here rather than in a
canary.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict

from flywheel_vision.preprocess import (
    INPUT_NAME,
    MNIST_PREPROCESS,
    OUTPUT_NAME,
    ImageInput,
    PreprocessSpec,
    preprocess_batch,
)

__all__ = ["Evaluation", "evaluate", "metrics_from_predictions"]


class Evaluation(BaseModel):
    """Quality, speed and size of one model on one labelled set."""

    model_config = ConfigDict(frozen=True)

    num_images: int
    accuracy: float
    macro_f1: float
    """Mean F1 over the classes present in the labels or the predictions."""
    per_class_recall: dict[str, float]
    """Recall of each class that has at least one labelled image, by class name."""
    confusion: list[list[int]]
    """``confusion[true][predicted]`` counts, by class index."""
    latency_p50_ms: float
    latency_p95_ms: float
    """Per single image (batch of one) on onnxruntime's CPU provider, preprocessing excluded."""
    model_size_bytes: int


def metrics_from_predictions(
    labels: npt.NDArray[np.int64], predictions: npt.NDArray[np.int64], num_classes: int
) -> tuple[float, float, dict[int, float], list[list[int]]]:
    """Accuracy, macro-F1, per-class recall (by index) and the confusion matrix."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    total = int(confusion.sum())
    accuracy = float(np.trace(confusion)) / total if total else 0.0
    true_positive = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    present = (support + predicted) > 0
    denominator = support + predicted
    f1 = np.divide(2 * true_positive, denominator, out=np.zeros(num_classes), where=present)
    macro_f1 = float(f1[present].mean()) if present.any() else 0.0
    recall = {
        index: float(true_positive[index] / support[index])
        for index in range(num_classes)
        if support[index] > 0
    }
    return accuracy, macro_f1, recall, confusion.tolist()


def evaluate(
    model: bytes | Path | str,
    samples: Sequence[tuple[ImageInput, int]],
    *,
    classes: Sequence[str] | None = None,
    batch_size: int = 256,
    latency_images: int = 100,
    threads: int = 1,
    preprocessing: PreprocessSpec = MNIST_PREPROCESS,
) -> Evaluation:
    """Evaluate an ONNX model (bytes or a file path) on ``(image, class index)`` pairs.

    Accuracy and F1 come from batched inference; latency from up to ``latency_images`` single
    images after a warm-up, on ``threads`` intra-op threads (one, like one serving instance
    per core, unless told otherwise). ``classes`` names the output indices in the recall map;
    ``preprocessing`` is the model's own (its ``model.json``).
    """
    onnx_bytes = model if isinstance(model, bytes) else Path(model).read_bytes()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        onnx_bytes, sess_options=options, providers=["CPUExecutionProvider"]
    )
    output_width = session.get_outputs()[0].shape[-1]
    num_classes = len(classes) if classes is not None else int(output_width)
    if isinstance(output_width, int) and output_width != num_classes:
        raise ValueError(f"model has {output_width} outputs but {num_classes} classes were named")
    labels = np.asarray([label for _, label in samples], dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    names = list(classes) if classes is not None else [str(i) for i in range(num_classes)]

    predictions = np.zeros(len(samples), dtype=np.int64)
    for start in range(0, len(samples), batch_size):
        batch = preprocess_batch(
            [image for image, _ in samples[start : start + batch_size]], preprocessing
        )
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch})
        predictions[start : start + len(batch)] = np.asarray(logits).argmax(axis=1)
    accuracy, macro_f1, recall, confusion = metrics_from_predictions(
        labels, predictions, num_classes
    )
    p50, p95 = _latency_ms(session, [image for image, _ in samples[:latency_images]], preprocessing)
    return Evaluation(
        num_images=len(samples),
        accuracy=accuracy,
        macro_f1=macro_f1,
        per_class_recall={names[index]: value for index, value in recall.items()},
        confusion=confusion,
        latency_p50_ms=p50,
        latency_p95_ms=p95,
        model_size_bytes=len(onnx_bytes),
    )


def _latency_ms(
    session: ort.InferenceSession, images: Sequence[ImageInput], preprocessing: PreprocessSpec
) -> tuple[float, float]:
    if not images:
        return 0.0, 0.0
    inputs = preprocess_batch(images, preprocessing)
    # The first runs allocate and pick kernels; they say nothing about steady-state latency.
    for _ in range(3):
        session.run([OUTPUT_NAME], {INPUT_NAME: inputs[:1]})
    timings = []
    for index in range(len(inputs)):
        started = time.perf_counter()
        session.run([OUTPUT_NAME], {INPUT_NAME: inputs[index : index + 1]})
        timings.append((time.perf_counter() - started) * 1000.0)
    p50, p95 = np.percentile(timings, [50, 95])
    return float(p50), float(p95)
