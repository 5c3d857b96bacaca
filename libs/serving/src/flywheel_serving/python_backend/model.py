"""Triton Python-backend model that runs one version's ``model.onnx`` with onnxruntime.

Copied into every version folder of a ``python``-flavour repository (the bundled Triton has no
ONNX Runtime backend). It imports nothing from Flywheel: the stub process runs it with only
the environment's third-party packages, and tensor names and thread counts come from the
model's ``config.pbtxt``. One ``execute`` call gets every request the dynamic batcher
gathered; they run as one onnxruntime call, which is the point of batching. Each request gets
the outputs it asked for (Triton fills in every output of the config when a request names
none) that the ONNX graph has: ``logits``, and ``embedding`` when the config declares it.

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
        # The first output is the class scores (the one a shuffle fault rotates).
        self._output_name: str = config["output"][0]["name"]
        self._output_dtypes = {
            output["name"]: pb_utils.triton_string_to_numpy(output["data_type"])
            for output in config["output"]
        }
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
        self._session_outputs = [output.name for output in self._session.get_outputs()]
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
        wanted: list[list[str]] = []
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
            wanted.append(self._requested(request))
        if not accepted:
            return responses
        # One run for the whole batch, computing every output some request asked for.
        names = [name for name in self._session_outputs if any(name in w for w in wanted)]
        try:
            results = self._session.run(names, {self._input_name: np.concatenate(batches)})
        except Exception as exc:
            for index in accepted:
                responses[index] = _error(f"onnxruntime failed: {exc}")
            return responses
        bounds = np.cumsum([len(batch) for batch in batches])[:-1]
        parts: dict[str, list[npt.NDArray[Any]]] = {}
        for name, result in zip(names, results, strict=True):
            array = np.asarray(result, dtype=self._output_dtypes.get(name, np.float32))
            if self._shuffle and name == self._output_name:
                array = np.roll(array, 1, axis=-1)
            parts[name] = np.split(array, bounds)
        for position, (index, names_wanted) in enumerate(zip(accepted, wanted, strict=True)):
            outputs = [
                pb_utils.Tensor(name, np.ascontiguousarray(parts[name][position]))
                for name in names
                if name in names_wanted
            ]
            responses[index] = pb_utils.InferenceResponse(output_tensors=outputs)
        return responses

    def _requested(self, request: Any) -> list[str]:
        """The outputs ``request`` asked for; all the config's when it names none (Triton itself
        fills those in before the request gets here)."""
        names = list(request.requested_output_names())
        return names or list(self._output_dtypes)

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
