"""ONNX export, parity check and Triton ``config.pbtxt``: what a trained model ships with.

The exported graph has a dynamic batch dimension, so Triton's dynamic batcher can stack single
requests, and its input and outputs carry the names from ``preprocess`` that the serving side
uses: ``logits``, and ``embedding`` for a model that gives one (``EmbeddingModel``, as
``DigitNet`` does). ``check_parity`` runs the export on onnxruntime against the PyTorch model
before anything is registered: an export that changed the maths must never reach a canary.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Final, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch
from torch import nn

from flywheel_vision.contract import CONFIG_FILE, LABELS_FILE, ONNX_FILE, STATE_DICT_FILE
from flywheel_vision.ddp import unwrap
from flywheel_vision.preprocess import EMBEDDING_NAME, INPUT_NAME, INPUT_SHAPE, OUTPUT_NAME

__all__ = [
    "CONFIG_FILE",
    "LABELS_FILE",
    "ONNX_FILE",
    "PARITY_TOLERANCE",
    "STATE_DICT_FILE",
    "EmbeddingModel",
    "ParityError",
    "TritonFlavour",
    "check_parity",
    "export_onnx",
    "labels_json",
    "read_labels",
    "triton_config",
]


PARITY_TOLERANCE: Final = 1e-4
"""Largest absolute logit difference between PyTorch and onnxruntime that passes."""

OPSET: Final = 20
"""ONNX opset; onnxruntime 1.20+ and Triton 24.x run it."""

TritonFlavour = Literal["onnxruntime_onnx", "python"]
"""Triton's ONNX Runtime platform, or its Python backend (a ``model.py`` that runs the ONNX)."""

_SAFE_TEXT = re.compile(r"^[\x20-\x7e]*$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU", "KIND_AUTO", "KIND_MODEL")


class ParityError(RuntimeError):
    """The ONNX export and the PyTorch model disagree beyond the tolerance."""


@runtime_checkable
class EmbeddingModel(Protocol):
    """A model that also gives its embedding (penultimate activations) with the logits."""

    def forward_with_embedding(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [N, K], embedding [N, D])`` of a batch of images."""
        ...


class _WithEmbedding(nn.Module):
    """Exports an ``EmbeddingModel`` with both outputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Named like the ONNX input, as ``DigitNet.forward``'s argument.
        model: EmbeddingModel = self.model  # type: ignore[assignment]
        return model.forward_with_embedding(image)


def export_onnx(
    model: nn.Module,
    *,
    opset: int = OPSET,
    input_shape: Sequence[int] = INPUT_SHAPE,
    embedding: bool | None = None,
) -> bytes:
    """Export ``model`` (plain or DDP-wrapped) to ONNX bytes with a dynamic batch dimension.

    ``input_shape`` is one image's ``(channels, height, width)``. A CPU copy in eval mode is
    exported, so the caller's model keeps its device and mode. The graph's output is
    ``logits``; a model that is an ``EmbeddingModel`` gets a second output ``embedding``
    unless ``embedding=False`` (``embedding=True`` for a model that is not one is an error).
    """
    plain = copy.deepcopy(unwrap(model)).cpu().eval()
    has_embedding = isinstance(plain, EmbeddingModel)
    if embedding and not has_embedding:
        raise ValueError(f"{type(plain).__name__} has no forward_with_embedding to export")
    with_embedding = has_embedding if embedding is None else embedding
    exported = _WithEmbedding(plain).eval() if with_embedding else plain
    sample = torch.zeros((2, *input_shape), dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        # torch.export's own pytree internals trip a deprecation of torch's; nothing of ours.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        program = torch.onnx.export(
            exported,
            (sample,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME, EMBEDDING_NAME] if with_embedding else [OUTPUT_NAME],
            dynamic_shapes={INPUT_NAME: {0: batch}},
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    if program is None:
        raise RuntimeError("the ONNX exporter returned no program")
    serialized: bytes = program.model_proto.SerializeToString()
    return serialized


def check_parity(
    model: nn.Module,
    onnx_bytes: bytes,
    sample: npt.NDArray[np.float32] | torch.Tensor,
    *,
    tolerance: float = PARITY_TOLERANCE,
) -> float:
    """Largest absolute difference of the outputs of ``model`` and the ONNX on ``sample``.

    ``sample`` is a preprocessed batch ``[N, 1, 28, 28]``. The logits are compared, and the
    embedding too when the ONNX has one and the model gives one. Raises ``ParityError`` above
    ``tolerance`` or when the shapes differ.
    """
    batch = sample.detach().cpu().numpy() if isinstance(sample, torch.Tensor) else sample
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    plain = copy.deepcopy(unwrap(model)).cpu().eval()
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    names = [OUTPUT_NAME]
    with torch.inference_mode():
        images = torch.from_numpy(batch.copy())
        if isinstance(plain, EmbeddingModel) and EMBEDDING_NAME in {
            output.name for output in session.get_outputs()
        }:
            names.append(EMBEDDING_NAME)
            expected = [tensor.numpy() for tensor in plain.forward_with_embedding(images)]
        else:
            expected = [plain(images).numpy()]
    actual = session.run(names, {INPUT_NAME: batch})
    difference = 0.0
    for name, got, wanted in zip(names, actual, expected, strict=True):
        got = np.asarray(got)
        if got.shape != wanted.shape:
            raise ParityError(f"ONNX {name} shape {got.shape} != PyTorch {wanted.shape}")
        if wanted.size:
            difference = max(difference, float(np.max(np.abs(got - wanted))))
    if not difference <= tolerance:
        raise ParityError(f"ONNX differs from PyTorch by {difference:.3g} > {tolerance:.3g}")
    return difference


def labels_json(classes: Sequence[str]) -> bytes:
    """``labels.json``: the class names in output-index order."""
    return json.dumps({"classes": list(classes)}, indent=2).encode()


def read_labels(data: bytes | str) -> list[str]:
    """The class names of a ``labels.json``, index ``i`` naming output ``i``."""
    parsed = json.loads(data)
    classes = parsed.get("classes") if isinstance(parsed, dict) else None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError("labels.json must hold {'classes': [str, ...]}")
    return classes


def _quoted(value: str) -> str:
    if not _SAFE_TEXT.match(value):
        raise ValueError(f"only printable ASCII goes into config.pbtxt, got {value!r}")
    # JSON's escaping of printable ASCII (\" and \\) is also protobuf text format's.
    return json.dumps(value)


def _ints(values: Sequence[int]) -> str:
    return "[ " + ", ".join(str(int(v)) for v in values) + " ]"


def triton_config(
    name: str,
    *,
    num_classes: int,
    max_batch_size: int,
    platform: TritonFlavour = "onnxruntime_onnx",
    preferred_batch_sizes: Sequence[int] = (),
    max_queue_delay_microseconds: int = 0,
    instance_count: int = 1,
    instance_kind: str = "KIND_CPU",
    versions: Sequence[int] | None = None,
    parameters: Mapping[str, str] | None = None,
    input_dims: Sequence[int] = INPUT_SHAPE,
    embedding_size: int | None = None,
) -> str:
    """A Triton ``config.pbtxt`` for the exported model.

    ``platform="onnxruntime_onnx"`` serves ``model.onnx`` with Triton's ONNX Runtime backend;
    ``platform="python"`` declares the Python backend (``backend: "python"``), whose
    ``model.py`` the serving side provides, with ``parameters`` handed to it as strings.
    ``versions`` pins the served versions (``version_policy: specific``); without it Triton
    serves the latest one. Dynamic batching is always on; ``preferred_batch_sizes`` and
    ``max_queue_delay_microseconds`` tune how long it waits to fill a batch. ``input_dims`` is
    one image's shape as the model declares it (``-1`` for a dimension that varies between
    the versions served together). ``embedding_size`` declares the second output
    ``embedding`` (dims ``[embedding_size]``), for models that all export one of that size.
    """
    if not _SAFE_NAME.match(name):
        raise ValueError(f"model name {name!r} must match {_SAFE_NAME.pattern}")
    if num_classes < 1 or max_batch_size < 1:
        raise ValueError("num_classes and max_batch_size must be >= 1")
    if any(size < 1 or size > max_batch_size for size in preferred_batch_sizes):
        raise ValueError("preferred batch sizes must lie in 1..max_batch_size")
    if max_queue_delay_microseconds < 0 or instance_count < 1:
        raise ValueError("queue delay must be >= 0 and instance count >= 1")
    if instance_kind not in _INSTANCE_KINDS:
        raise ValueError(f"instance_kind must be one of {_INSTANCE_KINDS}")
    if versions is not None and (not versions or any(v < 1 for v in versions)):
        raise ValueError("versions must be a non-empty list of numbers >= 1")
    if not input_dims or any(d < 1 and d != -1 for d in input_dims):
        raise ValueError("input dims must be positive, or -1 for a variable dimension")
    if embedding_size is not None and embedding_size < 1:
        raise ValueError("embedding_size must be >= 1")

    lines = [f"name: {_quoted(name)}"]
    if platform == "onnxruntime_onnx":
        lines += [f"platform: {_quoted(platform)}", f"default_model_filename: {_quoted(ONNX_FILE)}"]
    elif platform == "python":
        lines.append('backend: "python"')
    else:
        raise ValueError(f"unknown Triton flavour {platform!r}")
    lines += [
        f"max_batch_size: {max_batch_size}",
        "input [",
        "  {",
        f"    name: {_quoted(INPUT_NAME)}",
        "    data_type: TYPE_FP32",
        f"    dims: {_ints(input_dims)}",
        "  }",
        "]",
        "output [",
        "  {",
        f"    name: {_quoted(OUTPUT_NAME)}",
        "    data_type: TYPE_FP32",
        f"    dims: {_ints([num_classes])}",
        "  }" if embedding_size is None else "  },",
    ]
    if embedding_size is not None:
        lines += [
            "  {",
            f"    name: {_quoted(EMBEDDING_NAME)}",
            "    data_type: TYPE_FP32",
            f"    dims: {_ints([embedding_size])}",
            "  }",
        ]
    lines += [
        "]",
        "dynamic_batching {",
    ]
    if preferred_batch_sizes:
        lines.append(f"  preferred_batch_size: {_ints(sorted(set(preferred_batch_sizes)))}")
    lines += [
        f"  max_queue_delay_microseconds: {max_queue_delay_microseconds}",
        "}",
        "instance_group [",
        "  {",
        f"    count: {instance_count}",
        f"    kind: {instance_kind}",
        "  }",
        "]",
    ]
    if versions is not None:
        lines += [
            "version_policy {",
            f"  specific {{ versions: {_ints(sorted(set(versions)))} }}",
            "}",
        ]
    for key, value in sorted((parameters or {}).items()):
        lines += [
            "parameters {",
            f"  key: {_quoted(key)}",
            f"  value {{ string_value: {_quoted(value)} }}",
            "}",
        ]
    return "\n".join(lines) + "\n"
