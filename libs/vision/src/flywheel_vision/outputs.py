"""Checking what a training entry point left in its output folder, before anything is logged.

``read_outputs`` reads ``model.json``, ``model.onnx``, ``metrics.json`` and the optional
``params.json``, ``config.pbtxt`` and ``state_dict.pt``, and raises ``EntryPointOutputError``
naming the file at fault. ``smoke_test`` runs the model on a few images preprocessed as it
declared. The ONNX graph's tensors are renamed to the names serving uses, once, here.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field

from flywheel_vision.contract import (
    CONFIG_FILE,
    METRICS_FILE,
    ONNX_FILE,
    PARAMS_FILE,
    SIGNATURE_FILE,
    STATE_DICT_FILE,
    EntryPointOutputError,
    ModelSignature,
    TensorSpec,
    read_signature,
)
from flywheel_vision.preprocess import EMBEDDING_NAME, INPUT_NAME, OUTPUT_NAME, preprocess_batch

__all__ = ["ModelOutputs", "read_outputs", "smoke_test"]

_METRIC_NAME = re.compile(r"^[A-Za-z0-9_\-. /]{1,250}$")
_SAFE_TEXT = re.compile(r"^[\x09\x0a\x0d\x20-\x7e]*$")
_SMOKE_IMAGES: Final = 8


# --- outputs ----------------------------------------------------------------------------------


class ModelOutputs(BaseModel):
    """What rank 0 left, checked: the files the platform logs and the numbers it records."""

    model_config = ConfigDict(frozen=True)

    onnx: bytes
    """The model with the tensor names serving uses (renamed when the entry point chose others)."""
    signature: ModelSignature
    """``model.json`` with those names."""
    metrics: dict[str, list[float]]
    """Each metric's values by step; the last is its final value."""
    params: dict[str, str] = Field(default_factory=dict)
    config_pbtxt: str | None = None
    state_dict: bytes | None = None

    def final_metrics(self) -> dict[str, float]:
        return {name: values[-1] for name, values in self.metrics.items() if values}


def read_outputs(output_dir: Path, classes: Sequence[str]) -> ModelOutputs:
    """Read and check what the entry point left; ``EntryPointOutputError`` names the file.

    The ONNX graph must load in onnxruntime with one float32 input and one float32 output that
    match ``model.json``, a dynamic batch dimension, and one output per class; and, when
    ``model.json`` declares an embedding, a second float32 output ``[-1, D]`` of that name.
    """
    signature = read_signature(_required(output_dir, SIGNATURE_FILE))
    if signature.num_classes != len(classes):
        raise EntryPointOutputError(
            f"{SIGNATURE_FILE} declares {signature.num_classes} outputs but the snapshot has "
            f"{len(classes)} classes",
            details={"file": SIGNATURE_FILE, "classes": len(classes)},
        )
    onnx_bytes = _check_onnx(_required(output_dir, ONNX_FILE), signature)
    metrics = _read_metrics(_required(output_dir, METRICS_FILE))
    params = _read_params(output_dir / PARAMS_FILE)
    config = None
    if (output_dir / CONFIG_FILE).is_file():
        text = (output_dir / CONFIG_FILE).read_text(encoding="utf-8", errors="replace")
        if not _SAFE_TEXT.match(text) or "name:" not in text:
            raise EntryPointOutputError(
                f"{CONFIG_FILE} is not a Triton model configuration in plain text",
                details={"file": CONFIG_FILE},
            )
        config = text
    state = output_dir / STATE_DICT_FILE
    return ModelOutputs(
        onnx=_canonical_names(onnx_bytes, signature),
        signature=signature.canonical(),
        metrics=metrics,
        params=params,
        config_pbtxt=config,
        state_dict=state.read_bytes() if state.is_file() else None,
    )


def smoke_test(outputs: ModelOutputs, images: Sequence[Path]) -> None:
    """Run the model on a few images, preprocessed as declared: one finite score per class
    (and a finite embedding of the declared size, when one is declared)."""
    chosen = [path.read_bytes() for path in images[:_SMOKE_IMAGES]]
    if not chosen:
        return
    batch = preprocess_batch(chosen, outputs.signature.preprocessing)
    session = ort.InferenceSession(outputs.onnx, providers=["CPUExecutionProvider"])
    names = [OUTPUT_NAME]
    if outputs.signature.embedding_size is not None:
        names.append(EMBEDDING_NAME)
    try:
        scores, *embedding = session.run(names, {INPUT_NAME: batch})
    except Exception as error:  # onnxruntime's own exception types derive from Exception
        raise EntryPointOutputError(
            f"{ONNX_FILE} does not run on images preprocessed as {SIGNATURE_FILE} declares: "
            f"{' '.join(str(error).split())[:300]}",
            details={"file": ONNX_FILE},
        ) from error
    _check_answer("scores", scores, (len(chosen), outputs.signature.num_classes))
    if embedding and outputs.signature.embedding_size is not None:
        _check_answer("embeddings", embedding[0], (len(chosen), outputs.signature.embedding_size))


def _check_answer(what: str, answer: object, expected: tuple[int, int]) -> None:
    array: npt.NDArray[np.float32] = np.asarray(answer)
    if array.shape != expected:
        raise EntryPointOutputError(
            f"{ONNX_FILE} answered {what} of shape {list(array.shape)} for {expected[0]} "
            f"images; expected {list(expected)}",
            details={"file": ONNX_FILE},
        )
    if not np.all(np.isfinite(array)):
        raise EntryPointOutputError(
            f"{ONNX_FILE} answered non-finite {what}", details={"file": ONNX_FILE}
        )


def _required(folder: Path, name: str) -> bytes:
    path = folder / name
    if not path.is_file():
        raise EntryPointOutputError(
            f"the entry point left no {name} in its output folder", details={"file": name}
        )
    data = path.read_bytes()
    if not data:
        raise EntryPointOutputError(f"{name} is empty", details={"file": name})
    return data


def _check_onnx(data: bytes, signature: ModelSignature) -> bytes:
    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's own exception types derive from Exception
        raise EntryPointOutputError(
            f"{ONNX_FILE} does not load in onnxruntime: {' '.join(str(error).split())[:300]}",
            details={"file": ONNX_FILE},
        ) from error
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise EntryPointOutputError(
            f"{ONNX_FILE} has {len(inputs)} inputs; exactly one is supported",
            details={"file": ONNX_FILE},
        )
    _check_tensor("input", inputs[0], signature.input)
    declared = [signature.output] + ([signature.embedding] if signature.embedding else [])
    if len(outputs) != len(declared):
        raise EntryPointOutputError(
            f"{ONNX_FILE} has {len(outputs)} outputs; {SIGNATURE_FILE} declares "
            f"{len(declared)} ({', '.join(repr(tensor.name) for tensor in declared)})",
            details={"file": ONNX_FILE},
        )
    if signature.embedding is None:
        _check_tensor("output", outputs[0], signature.output)
        return data
    by_name = {tensor.name: tensor for tensor in outputs}
    for kind, tensor in (("output", signature.output), ("embedding output", signature.embedding)):
        if tensor.name not in by_name:
            raise EntryPointOutputError(
                f"{ONNX_FILE} has no output {tensor.name!r}, which {SIGNATURE_FILE} declares "
                f"as its {kind}; it has {sorted(by_name)}",
                details={"file": ONNX_FILE},
            )
        _check_tensor(kind, by_name[tensor.name], tensor)
    return data


def _check_tensor(kind: str, tensor: ort.NodeArg, declared: TensorSpec) -> None:
    """One ONNX tensor against its declaration: name, float32, rank, dynamic batch, sizes."""
    if tensor.name != declared.name:
        raise EntryPointOutputError(
            f"{ONNX_FILE} names its {kind} {tensor.name!r} but {SIGNATURE_FILE} declares "
            f"{declared.name!r}",
            details={"file": ONNX_FILE},
        )
    if tensor.type != "tensor(float)":
        raise EntryPointOutputError(
            f"{ONNX_FILE} {kind} {tensor.name!r} is {tensor.type}; float32 is required",
            details={"file": ONNX_FILE},
        )
    shape = list(tensor.shape)
    if len(shape) != len(declared.shape):
        raise EntryPointOutputError(
            f"{ONNX_FILE} {kind} {tensor.name!r} has {len(shape)} dimensions; "
            f"{SIGNATURE_FILE} declares {list(declared.shape)}",
            details={"file": ONNX_FILE},
        )
    if isinstance(shape[0], int) and shape[0] > 0:
        raise EntryPointOutputError(
            f"{ONNX_FILE} {kind} {tensor.name!r} has a fixed batch dimension {shape[0]}; "
            "export it with a dynamic one",
            details={"file": ONNX_FILE},
        )
    for index, (actual, wanted) in enumerate(zip(shape[1:], declared.shape[1:], strict=True)):
        if isinstance(actual, int) and actual > 0 and actual != wanted:
            raise EntryPointOutputError(
                f"{ONNX_FILE} {kind} {tensor.name!r} has {actual} at dimension "
                f"{index + 1}; {SIGNATURE_FILE} declares {wanted}",
                details={"file": ONNX_FILE},
            )


def _canonical_names(data: bytes, signature: ModelSignature) -> bytes:
    """The graph with its input named ``image``, its output ``logits`` and its embedding output
    (when declared) ``embedding``.

    Serving, validation and tuning address every version by these names, so a model whose
    author chose others is renamed once here rather than carried through every consumer.
    """
    pairs = [(signature.input.name, INPUT_NAME), (signature.output.name, OUTPUT_NAME)]
    if signature.embedding is not None:
        pairs.append((signature.embedding.name, EMBEDDING_NAME))
    renames = {old: new for old, new in pairs if old != new}
    if not renames:
        return data
    model = onnx.load_from_string(data)
    graph = model.graph
    taken = {value for node in graph.node for value in (*node.input, *node.output)}
    taken |= {tensor.name for tensor in graph.initializer}
    for new in renames.values():
        if new in taken and new not in renames:
            raise EntryPointOutputError(
                f"{ONNX_FILE} already has a tensor named {new!r}; rename it",
                details={"file": ONNX_FILE},
            )
    for value in (*graph.input, *graph.output, *graph.value_info):
        value.name = renames.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
    onnx.checker.check_model(model)
    serialized: bytes = model.SerializeToString()
    return serialized


def _read_metrics(data: bytes) -> dict[str, list[float]]:
    try:
        raw = json.loads(data)
    except ValueError as error:
        raise EntryPointOutputError(
            f"{METRICS_FILE} is not JSON", details={"file": METRICS_FILE}
        ) from error
    if not isinstance(raw, dict):
        raise EntryPointOutputError(
            f"{METRICS_FILE} must hold an object of metric name → number or list of numbers",
            details={"file": METRICS_FILE},
        )
    metrics: dict[str, list[float]] = {}
    for name, value in raw.items():
        values = value if isinstance(value, list) else [value]
        if not _METRIC_NAME.match(name) or not values or not all(_is_number(v) for v in values):
            raise EntryPointOutputError(
                f"{METRICS_FILE}: {name!r} must be a finite number or a non-empty list of them",
                details={"file": METRICS_FILE, "metric": name[:100]},
            )
        metrics[name] = [float(v) for v in values]
    return metrics


def _is_number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _read_params(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_bytes())
    except ValueError as error:
        raise EntryPointOutputError(
            f"{PARAMS_FILE} is not JSON", details={"file": PARAMS_FILE}
        ) from error
    if not isinstance(raw, dict) or not all(
        isinstance(v, str | int | float | bool) for v in raw.values()
    ):
        raise EntryPointOutputError(
            f"{PARAMS_FILE} must hold an object of parameter name → string, number or bool",
            details={"file": PARAMS_FILE},
        )
    return {str(key): str(value) for key, value in raw.items()}
