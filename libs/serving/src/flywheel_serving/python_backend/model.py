"""Triton Python-backend model that runs one version's ``model.onnx`` with onnxruntime.

Copied into every version folder of a ``python``-flavour repository (the bundled Triton has no
ONNX Runtime backend). It imports nothing from Flywheel: the stub process runs it with only
the environment's third-party packages, and tensor names and thread counts come from the
model's ``config.pbtxt``. One ``execute`` call gets every request the dynamic batcher
gathered; they run as one onnxruntime call, which is the point of batching.

Fault injection, for canary and fault tests only and off unless asked for: when the server's
environment names a JSON file in ``FLYWHEEL_SERVING_FAULTS``, an entry keyed
``"<model>:<version>"`` makes that version misbehave from the moment it is loaded:
``{"delay_ms": 300}`` answers every ``execute`` that much later (slow), ``{"shuffle": true}``
rotates the output classes by one, so each answer names the wrong class (wrong). The file is
read once, at ``initialize``; versions it does not name, and every version when the variable is
unset, serve normally.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

ONNX_FILE = "model.onnx"
THREADS_PARAMETER = "intra_op_threads"
FAULTS_ENV = "FLYWHEEL_SERVING_FAULTS"


class TritonPythonModel:
    """One instance of one version: an onnxruntime session and the names of its tensors."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self._input_name: str = config["input"][0]["name"]
        self._output_name: str = config["output"][0]["name"]
        self._output_dtype = pb_utils.triton_string_to_numpy(config["output"][0]["data_type"])
        self._input_dims = tuple(int(d) for d in config["input"][0]["dims"])
        threads = config.get("parameters", {}).get(THREADS_PARAMETER, {}).get("string_value")
        options = ort.SessionOptions()
        # Triton runs several instances and versions side by side; each takes few threads.
        options.intra_op_num_threads = int(threads) if threads else 1
        options.inter_op_num_threads = 1
        path = Path(args["model_repository"]) / args["model_version"] / ONNX_FILE
        self._session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        name = args.get("model_name") or config.get("name", "")
        fault = _fault(f"{name}:{args['model_version']}")
        self._delay_s = float(fault.get("delay_ms", 0)) / 1000
        self._shuffle = bool(fault.get("shuffle", False))

    def execute(self, requests: list[Any]) -> list[Any]:
        if self._delay_s > 0:
            time.sleep(self._delay_s)
        responses: list[Any] = [None] * len(requests)
        batches: list[npt.NDArray[np.float32]] = []
        accepted: list[int] = []
        for index, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, self._input_name)
            if tensor is None:
                responses[index] = _error(f"input {self._input_name!r} is missing")
                continue
            array = tensor.as_numpy()
            if array.ndim != len(self._input_dims) + 1 or any(
                # -1: a dimension the versions served together do not share.
                want not in (-1, got)
                for want, got in zip(self._input_dims, array.shape[1:], strict=True)
            ):
                responses[index] = _error(
                    f"input {self._input_name!r} has shape {list(array.shape)}, "
                    f"expected [N, {', '.join(str(d) for d in self._input_dims)}]"
                )
                continue
            batches.append(np.ascontiguousarray(array, dtype=np.float32))
            accepted.append(index)
        if not accepted:
            return responses
        try:
            (logits,) = self._session.run(
                [self._output_name], {self._input_name: np.concatenate(batches)}
            )
        except Exception as exc:
            for index in accepted:
                responses[index] = _error(f"onnxruntime failed: {exc}")
            return responses
        logits = np.asarray(logits, dtype=self._output_dtype)
        if self._shuffle:
            logits = np.roll(logits, 1, axis=-1)
        bounds = np.cumsum([len(batch) for batch in batches])[:-1]
        for index, part in zip(accepted, np.split(logits, bounds), strict=True):
            output = pb_utils.Tensor(self._output_name, np.ascontiguousarray(part))
            responses[index] = pb_utils.InferenceResponse(output_tensors=[output])
        return responses

    def finalize(self) -> None:
        self._session = None


def _fault(key: str) -> dict[str, Any]:
    """The fault ``FLYWHEEL_SERVING_FAULTS`` injects into version ``key``; empty for none."""
    path = os.environ.get(FAULTS_ENV)
    if not path:
        return {}
    faults: dict[str, dict[str, Any]] = json.loads(Path(path).read_text())
    return faults.get(key, {})


def _error(message: str) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
