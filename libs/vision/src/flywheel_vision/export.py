"""ONNX export, parity check and Triton ``config.pbtxt``: what a trained model ships with.

The exported graph has a dynamic batch dimension, so Triton's dynamic batcher can stack single
requests, and its input and output carry the names from ``preprocess`` that the serving side
uses. ``check_parity`` runs the export on onnxruntime against the PyTorch model before anything
is registered: an export that changed the maths must never reach a canary.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch
from torch import nn

from flywheel_vision.contract import CONFIG_FILE, LABELS_FILE, ONNX_FILE, STATE_DICT_FILE
from flywheel_vision.ddp import unwrap
from flywheel_vision.preprocess import INPUT_NAME, INPUT_SHAPE, OUTPUT_NAME

__all__ = [
    "CONFIG_FILE",
    "LABELS_FILE",
    "ONNX_FILE",
    "PARITY_TOLERANCE",
    "STATE_DICT_FILE",
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


def export_onnx(
    model: nn.Module, *, opset: int = OPSET, input_shape: Sequence[int] = INPUT_SHAPE
) -> bytes:
    """Export ``model`` (plain or DDP-wrapped) to ONNX bytes with a dynamic batch dimension.

    ``input_shape`` is one image's ``(channels, height, width)``. A CPU copy in eval mode is
    exported, so the caller's model keeps its device and mode.
    """
    plain = copy.deepcopy(unwrap(model)).cpu().eval()
    sample = torch.zeros((2, *input_shape), dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        # torch.export's own pytree internals trip a deprecation of torch's; nothing of ours.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        program = torch.onnx.export(
            plain,
            (sample,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
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
    """Largest absolute difference of the logits of ``model`` and the ONNX on ``sample``.

    ``sample`` is a preprocessed batch ``[N, 1, 28, 28]``. Raises ``ParityError`` above
    ``tolerance`` or when the shapes differ.
    """
    batch = sample.detach().cpu().numpy() if isinstance(sample, torch.Tensor) else sample
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    plain = copy.deepcopy(unwrap(model)).cpu().eval()
    with torch.inference_mode():
        expected = plain(torch.from_numpy(batch.copy())).numpy()
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    (actual,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch})
    actual = np.asarray(actual)
    if actual.shape != expected.shape:
        raise ParityError(f"ONNX output shape {actual.shape} != PyTorch {expected.shape}")
    difference = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
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
) -> str:
    """A Triton ``config.pbtxt`` for the exported model.

    ``platform="onnxruntime_onnx"`` serves ``model.onnx`` with Triton's ONNX Runtime backend;
    ``platform="python"`` declares the Python backend (``backend: "python"``), whose
    ``model.py`` the serving side provides, with ``parameters`` handed to it as strings.
    ``versions`` pins the served versions (``version_policy: specific``); without it Triton
    serves the latest one. Dynamic batching is always on; ``preferred_batch_sizes`` and
    ``max_queue_delay_microseconds`` tune how long it waits to fill a batch. ``input_dims`` is
    one image's shape as the model declares it (``-1`` for a dimension that varies between
    the versions served together).
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
        "  }",
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
