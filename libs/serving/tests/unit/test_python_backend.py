import importlib.util
import json
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from flywheel_serving.repository import ServingOptions, build_model_repository
from flywheel_testing.serving import digit_model_files, digit_onnx
from flywheel_vision.model import EMBEDDING_SIZE
from flywheel_vision.preprocess import EMBEDDING_NAME, INPUT_NAME, INPUT_SHAPE, OUTPUT_NAME


class FakeTensor:
    def __init__(self, name: str, array: npt.NDArray[Any]) -> None:
        self.name = name
        self.array = array

    def as_numpy(self) -> npt.NDArray[Any]:
        return self.array


class FakeError:
    def __init__(self, message: str) -> None:
        self.message = message


class FakeRequest(dict[str, FakeTensor]):
    """A request: its input tensors by name, and the outputs it asks for."""

    def __init__(self, inputs: dict[str, FakeTensor], outputs: tuple[str, ...] = ()) -> None:
        super().__init__(inputs)
        self.outputs = outputs

    def requested_output_names(self) -> list[str]:
        return list(self.outputs)


class FakeResponse:
    def __init__(self, output_tensors: list[FakeTensor], error: FakeError | None = None) -> None:
        self.output_tensors = output_tensors
        self.error = error


def _fake_pb_utils() -> types.ModuleType:
    """The few names of Triton's ``triton_python_backend_utils`` that ``model.py`` uses."""
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = FakeTensor  # type: ignore[attr-defined]
    module.TritonError = FakeError  # type: ignore[attr-defined]
    module.InferenceResponse = FakeResponse  # type: ignore[attr-defined]
    module.get_input_tensor_by_name = lambda request, name: request.get(name)  # type: ignore[attr-defined]
    module.triton_string_to_numpy = {"TYPE_FP32": np.float32}.__getitem__  # type: ignore[attr-defined]
    return module


def _load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, embedding: bool = True) -> Any:
    """``model.py`` as Triton's stub runs it: from a version folder, with its model config."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    model_dir = build_model_repository(
        tmp_path,
        "digits",
        [digit_model_files("digits", "4", seed=4, embedding=embedding)],
        ServingOptions(flavour="python"),
    )
    spec = importlib.util.spec_from_file_location("served_model", model_dir / "4" / "model.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    instance = module.TritonPythonModel()
    outputs = [{"name": OUTPUT_NAME, "data_type": "TYPE_FP32", "dims": ["10"]}]
    if embedding:
        outputs.append(
            {"name": EMBEDDING_NAME, "data_type": "TYPE_FP32", "dims": [str(EMBEDDING_SIZE)]}
        )
    config = {  # Triton hands the config over as JSON, 64-bit numbers as strings
        "name": "digits",
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_FP32", "dims": ["1", "28", "28"]}],
        "output": outputs,
        "parameters": {"intra_op_threads": {"string_value": "1"}},
    }
    instance.initialize(
        {
            "model_config": json.dumps(config),
            "model_name": "digits",
            "model_repository": str(model_dir),
            "model_version": "4",
        }
    )
    return instance


@pytest.fixture
def model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    instance = _load(tmp_path, monkeypatch)
    yield instance
    instance.finalize()


def _faults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, faults: dict[str, Any]) -> None:
    path = tmp_path / "faults.json"
    path.write_text(json.dumps(faults))
    monkeypatch.setenv("FLYWHEEL_SERVING_FAULTS", str(path))


def _request(
    batch: npt.NDArray[np.float32], outputs: tuple[str, ...] = (OUTPUT_NAME,)
) -> FakeRequest:
    return FakeRequest({INPUT_NAME: FakeTensor(INPUT_NAME, batch)}, outputs)


def test_requests_run_as_one_batch_and_each_gets_its_own_rows_back(model: Any) -> None:
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, *INPUT_SHAPE)).astype(np.float32) for n in (1, 3, 2)]
    session = ort.InferenceSession(digit_onnx(4), providers=["CPUExecutionProvider"])
    calls: list[int] = []
    real_run = model._session.run

    def counting_run(names: list[str], feeds: dict[str, Any]) -> list[Any]:
        calls.append(len(feeds[INPUT_NAME]))
        return real_run(names, feeds)  # type: ignore[no-any-return]

    model._session = types.SimpleNamespace(run=counting_run)

    responses = model.execute([_request(batch) for batch in batches])

    assert calls == [6]
    for batch, response in zip(batches, responses, strict=True):
        (expected,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch})
        assert response.error is None
        assert response.output_tensors[0].name == OUTPUT_NAME
        assert response.output_tensors[0].array.dtype == np.float32
        assert np.allclose(response.output_tensors[0].array, expected, atol=1e-5)


def test_a_bad_request_gets_an_error_and_the_others_their_answers(model: Any) -> None:
    good = np.zeros((2, *INPUT_SHAPE), dtype=np.float32)
    wrong_shape = np.zeros((1, 1, 28, 27), dtype=np.float32)

    responses = model.execute([FakeRequest({}), _request(good), _request(wrong_shape)])

    assert "input 'image' is missing" in responses[0].error.message
    assert responses[1].error is None
    assert responses[1].output_tensors[0].array.shape == (2, 10)
    assert "expected [N, 1, 28, 28]" in responses[2].error.message


def test_an_onnxruntime_failure_fails_every_request_of_the_batch(model: Any) -> None:
    def fail(names: list[str], feeds: dict[str, Any]) -> list[Any]:
        raise RuntimeError("out of memory")

    model._session = types.SimpleNamespace(run=fail)
    batch = np.zeros((1, *INPUT_SHAPE), dtype=np.float32)

    responses = model.execute([_request(batch), _request(batch)])

    assert [r.error.message for r in responses] == ["onnxruntime failed: out of memory"] * 2


def _reference(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    session = ort.InferenceSession(digit_onnx(4), providers=["CPUExecutionProvider"])
    (expected,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch})
    return np.asarray(expected)


def test_no_fault_is_injected_unless_the_environment_names_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLYWHEEL_SERVING_FAULTS", raising=False)
    model = _load(tmp_path, monkeypatch)
    batch = np.random.default_rng(1).standard_normal((2, *INPUT_SHAPE)).astype(np.float32)

    [response] = model.execute([_request(batch)])

    assert model._delay_s == 0
    assert not model._shuffle
    assert np.allclose(response.output_tensors[0].array, _reference(batch), atol=1e-5)


def test_a_faulty_version_answers_late_with_its_classes_rotated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _faults(tmp_path, monkeypatch, {"digits:4": {"delay_ms": 60, "shuffle": True}})
    model = _load(tmp_path, monkeypatch)
    batch = np.random.default_rng(2).standard_normal((3, *INPUT_SHAPE)).astype(np.float32)

    started = time.perf_counter()
    [response] = model.execute([_request(batch)])
    elapsed = time.perf_counter() - started

    assert elapsed >= 0.06
    answered = response.output_tensors[0].array
    expected = _reference(batch)
    assert np.allclose(answered, np.roll(expected, 1, axis=-1), atol=1e-5)
    assert (answered.argmax(axis=1) != expected.argmax(axis=1)).all()


def test_versions_the_fault_file_does_not_name_serve_normally(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _faults(tmp_path, monkeypatch, {"digits:5": {"delay_ms": 5000, "shuffle": True}})
    model = _load(tmp_path, monkeypatch)
    batch = np.zeros((1, *INPUT_SHAPE), dtype=np.float32)

    [response] = model.execute([_request(batch)])

    assert model._delay_s == 0
    assert np.allclose(response.output_tensors[0].array, _reference(batch), atol=1e-5)


def test_each_request_gets_the_outputs_it_asked_for_from_one_run(model: Any) -> None:
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((n, *INPUT_SHAPE)).astype(np.float32) for n in (2, 1, 3)]
    asked = [(OUTPUT_NAME, EMBEDDING_NAME), (OUTPUT_NAME,), (EMBEDDING_NAME,)]
    session = ort.InferenceSession(digit_onnx(4), providers=["CPUExecutionProvider"])

    responses = model.execute(
        [_request(batch, outputs) for batch, outputs in zip(batches, asked, strict=True)]
    )

    for batch, outputs, response in zip(batches, asked, responses, strict=True):
        assert response.error is None
        assert tuple(tensor.name for tensor in response.output_tensors) == outputs
        expected = dict(
            zip(
                (OUTPUT_NAME, EMBEDDING_NAME),
                session.run([OUTPUT_NAME, EMBEDDING_NAME], {INPUT_NAME: batch}),
                strict=True,
            )
        )
        for tensor in response.output_tensors:
            assert tensor.array.dtype == np.float32
            assert np.allclose(tensor.array, expected[tensor.name], atol=1e-5)
    assert responses[0].output_tensors[1].array.shape == (2, EMBEDDING_SIZE)


def test_a_request_naming_no_output_gets_every_output_of_the_config(model: Any) -> None:
    [response] = model.execute([_request(np.zeros((1, *INPUT_SHAPE), np.float32), ())])

    assert [tensor.name for tensor in response.output_tensors] == [OUTPUT_NAME, EMBEDDING_NAME]


def test_a_model_without_embedding_answers_its_scores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _load(tmp_path, monkeypatch, embedding=False)
    batch = np.zeros((2, *INPUT_SHAPE), dtype=np.float32)

    [response] = model.execute([_request(batch, (OUTPUT_NAME, EMBEDDING_NAME))])

    assert [tensor.name for tensor in response.output_tensors] == [OUTPUT_NAME]
    assert response.output_tensors[0].array.shape == (2, 10)
