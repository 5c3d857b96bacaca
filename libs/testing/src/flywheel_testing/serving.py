"""Model versions for serving tests: real ONNX digit classifiers, made in a second, untrained.

Each seed gives other weights, so versions of one model answer differently and a test can
tell which version served a request. Nothing is trained: the weights are the seeded random
initialisation, which is all a serving test needs. Like the reference training's, each model
has two outputs, ``logits`` and the 64-d ``embedding``, and its ``model.json`` declares both;
``embedding=False`` gives a model of one output and no declared embedding (versions made
before embeddings existed).
"""

from __future__ import annotations

import functools
import tempfile
import uuid
from pathlib import Path
from typing import Final

import torch
from mlflow import MlflowClient

from flywheel_clients.registry import ModelFiles
from flywheel_vision.contract import SIGNATURE_FILE, reference_signature
from flywheel_vision.export import export_onnx, labels_json
from flywheel_vision.model import EMBEDDING_SIZE, DigitNet

__all__ = [
    "DIGIT_LABELS",
    "digit_model_files",
    "digit_model_json",
    "digit_onnx",
    "register_model_files",
]

DIGIT_LABELS: Final = tuple(str(digit) for digit in range(10))
"""Class names of the digit models, in output order."""


@functools.cache
def digit_onnx(seed: int, *, embedding: bool = True) -> bytes:
    """ONNX of a ``DigitNet`` whose weights come from ``seed``, with the ``embedding`` output
    unless told otherwise; cached, exporting takes ~1 s."""
    # A forked generator: seeding must not change the random stream of the test that asks.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitNet(num_classes=len(DIGIT_LABELS))
    return export_onnx(model, embedding=embedding)


def digit_model_json(*, embedding: bool = True) -> bytes:
    """The ``model.json`` of the digit models: the reference signature, with the embedding."""
    signature = reference_signature(
        len(DIGIT_LABELS), embedding_size=EMBEDDING_SIZE if embedding else None
    )
    return signature.model_dump_json(indent=2).encode()


def digit_model_files(name: str, version: str, seed: int, *, embedding: bool = True) -> ModelFiles:
    """The files of version ``version`` of model ``name``, as the registry would return them."""
    return ModelFiles(
        name=name,
        version=version,
        onnx=digit_onnx(seed, embedding=embedding),
        labels=list(DIGIT_LABELS),
        model_json=digit_model_json(embedding=embedding),
    )


def register_model_files(tracking_uri: str, files: ModelFiles) -> str:
    """Register ``files`` as a new model ``files.name`` in MLflow, the way training leaves a
    version (``model/model.onnx``, ``model/labels.json`` and, when the files have one,
    ``model/model.json`` in a finished run); its number."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    run = client.create_run(client.create_experiment(f"{files.name}-{uuid.uuid4().hex[:6]}"))
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "model.onnx").write_bytes(files.onnx)
        (Path(folder) / "labels.json").write_bytes(labels_json(files.labels))
        if files.model_json is not None:
            (Path(folder) / SIGNATURE_FILE).write_bytes(files.model_json)
        client.log_artifacts(run.info.run_id, folder, artifact_path="model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(files.name)
    version = client.create_model_version(
        files.name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    return str(version.version)
