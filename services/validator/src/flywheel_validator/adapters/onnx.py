"""``Evaluator`` on onnxruntime and PyTorch: models judged as serving will run them.

Scoring goes through ``flywheel_vision.evaluate`` (the shared preprocessing with the version's
declared spec, onnxruntime's CPU provider, single-image latency). The parity check loads the
version's state dict into ``DigitNet`` and compares its logits with the ONNX graph's on a few
test images; a version of another architecture (its ``model.json`` says so) has nothing the
validator could rerun, so parity does not apply to it. ``describe`` runs a version over the
test images once more for its drift reference: predicted class names, the ``embedding`` output
when the version declares one, and ``image_statistics`` of each image as it was uploaded. All
are CPU-bound and run in a worker thread, one model at a time, so latencies are not measured
while another model competes for the same cores.
"""

from __future__ import annotations

import asyncio
import io
import math
import pickle
import threading
import zipfile
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from flywheel_clients.registry import ModelFiles
from flywheel_runtime.drift_reference import STATISTICS, DriftReference
from flywheel_runtime.errors import InvalidInputError
from flywheel_validator.errors import ModelUnusableError
from flywheel_validator.gates import ModelScore, ParityCheck
from flywheel_validator.ports import LabeledImage
from flywheel_validator.scoring import by_class_name, score
from flywheel_vision.contract import ModelSignature, signature_or_reference
from flywheel_vision.evaluate import evaluate
from flywheel_vision.export import check_parity
from flywheel_vision.model import DigitNet
from flywheel_vision.preprocess import (
    EMBEDDING_NAME,
    INPUT_NAME,
    OUTPUT_NAME,
    image_statistics,
    preprocess_batch,
)
from flywheel_vision.reference import ARCHITECTURE

# What onnxruntime and the evaluation raise for a graph that does not load or does not fit:
# its own exception classes derive from Exception directly.
_ONNX_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    RuntimeError,
    ort_errors.Fail,
    ort_errors.InvalidArgument,
    ort_errors.InvalidProtobuf,
    ort_errors.InvalidGraph,
    ort_errors.NoSuchFile,
    ort_errors.NotImplemented,
    ort_errors.RuntimeException,
)
# What loading a state dict raises when the bytes are not one, or do not fit DigitNet.
_WEIGHT_ERRORS: tuple[type[Exception], ...] = (
    *_ONNX_ERRORS,
    pickle.UnpicklingError,
    EOFError,
    zipfile.BadZipFile,
    KeyError,
    TypeError,
)
# What running a version over the test images raises: onnxruntime's, and preprocessing's.
_DESCRIBE_ERRORS: tuple[type[Exception], ...] = (*_ONNX_ERRORS, InvalidInputError)
_MESSAGE_LIMIT = 300
_BATCH = 256


class OnnxEvaluator:
    """Scores ONNX models and checks export parity; safe to share across tasks."""

    def __init__(
        self, *, latency_images: int = 100, parity_images: int = 16, threads: int = 1
    ) -> None:
        self._latency_images = latency_images
        self._parity_images = parity_images
        self._threads = threads
        # One model at a time: latencies measured side by side would measure each other.
        self._lock = threading.Lock()

    async def score(self, files: ModelFiles, images: Sequence[LabeledImage]) -> ModelScore:
        return await asyncio.to_thread(self._score, files, images)

    async def parity(self, files: ModelFiles, images: Sequence[LabeledImage]) -> ParityCheck:
        return await asyncio.to_thread(self._parity, files, images)

    async def describe(self, files: ModelFiles, images: Sequence[LabeledImage]) -> DriftReference:
        return await asyncio.to_thread(self._describe, files, images)

    def _score(self, files: ModelFiles, images: Sequence[LabeledImage]) -> ModelScore:
        try:
            samples, unknown = by_class_name(images, files.labels)
        except ValueError as error:
            raise ModelUnusableError(_short(error)) from error
        signature = _signature(files)
        with self._lock:
            try:
                evaluation = evaluate(
                    files.onnx,
                    samples,
                    classes=files.labels,
                    latency_images=self._latency_images,
                    threads=self._threads,
                    preprocessing=signature.preprocessing,
                )
            except _ONNX_ERRORS as error:
                raise ModelUnusableError(_short(error)) from error
        return score(evaluation, unknown)

    def _parity(self, files: ModelFiles, images: Sequence[LabeledImage]) -> ParityCheck:
        try:
            signature = _signature(files)
        except ModelUnusableError as error:
            return ParityCheck(error=error.message)
        if signature.architecture not in (None, ARCHITECTURE):
            return ParityCheck(
                not_applicable=f"{signature.architecture} is not the reference {ARCHITECTURE}"
            )
        if files.state_dict is None:
            return ParityCheck(error="the version has no state dict")
        chosen = [image.data for image in images[: self._parity_images]]
        if not chosen:
            return ParityCheck(error="no test images")
        with self._lock:
            try:
                state = torch.load(
                    io.BytesIO(files.state_dict), map_location="cpu", weights_only=True
                )
                model = DigitNet(len(files.labels))
                model.load_state_dict(state, strict=True)
            except _WEIGHT_ERRORS as error:
                return ParityCheck(error=f"state dict does not load into DigitNet: {_short(error)}")
            try:
                # Measured, not enforced here: the gate compares it with the project's tolerance.
                difference = check_parity(
                    model, files.onnx, preprocess_batch(chosen), tolerance=math.inf
                )
            except _ONNX_ERRORS as error:
                return ParityCheck(error=f"ONNX and PyTorch outputs differ: {_short(error)}")
        return ParityCheck(max_abs_diff=difference, images=len(chosen))

    def _describe(self, files: ModelFiles, images: Sequence[LabeledImage]) -> DriftReference:
        signature = _signature(files)
        try:
            statistics = _statistics(images)
        except InvalidInputError as error:
            raise ModelUnusableError(error.message) from error
        names = [OUTPUT_NAME]
        if signature.embedding_size is not None:
            names.append(EMBEDDING_NAME)
        predicted: list[str] = []
        embeddings: list[npt.NDArray[np.float64]] = []
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        with self._lock:
            try:
                session = ort.InferenceSession(
                    files.onnx, sess_options=options, providers=["CPUExecutionProvider"]
                )
                for start in range(0, len(images), _BATCH):
                    chunk = [image.data for image in images[start : start + _BATCH]]
                    batch = preprocess_batch(chunk, signature.preprocessing)
                    logits, *embedding = session.run(names, {INPUT_NAME: batch})
                    scores = np.asarray(logits)
                    if scores.shape != (len(chunk), len(files.labels)):
                        raise ValueError(
                            f"{OUTPUT_NAME} has shape {list(scores.shape)} for {len(chunk)} "
                            f"images of {len(files.labels)} classes"
                        )
                    predicted += [files.labels[index] for index in scores.argmax(axis=1)]
                    if embedding:
                        embeddings.append(np.asarray(embedding[0], dtype=np.float64))
            except _DESCRIBE_ERRORS as error:
                raise ModelUnusableError(_short(error)) from error
        stacked = None
        if signature.embedding_size is not None:
            size = signature.embedding_size
            stacked = np.concatenate(embeddings) if embeddings else np.zeros((0, size))
            if stacked.shape != (len(images), size):
                raise ModelUnusableError(
                    f"{EMBEDDING_NAME} has shape {list(stacked.shape)} for {len(images)} images; "
                    f"model.json declares {size} values per image"
                )
        return DriftReference(predicted=predicted, embeddings=stacked, statistics=statistics)


def _statistics(images: Sequence[LabeledImage]) -> dict[str, npt.NDArray[np.float64]]:
    """``image_statistics`` of each image as uploaded, by statistic."""
    columns = {name: np.zeros(len(images), dtype=np.float64) for name in STATISTICS}
    for row, image in enumerate(images):
        for name, value in image_statistics(image.data).items():
            if name in columns:
                columns[name][row] = value
    return columns


def _signature(files: ModelFiles) -> ModelSignature:
    """The version's declaration; the MNIST reference one for versions without."""
    try:
        return signature_or_reference(files.model_json, len(files.labels))
    except InvalidInputError as error:
        raise ModelUnusableError(error.message) from error


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 1] + "…"
