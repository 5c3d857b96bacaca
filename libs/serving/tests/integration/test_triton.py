import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
import tritonclient.http.aio as http_aio
from tritonclient.http import InferInput, InferRequestedOutput

from flywheel_clients.registry import ModelFiles
from flywheel_serving.errors import ModelLoadError, TritonStartError
from flywheel_serving.repository import ServingOptions, build_model_repository
from flywheel_serving.triton import TritonControl, TritonServer
from flywheel_testing.net import free_ports
from flywheel_testing.serving import digit_model_files, digit_onnx
from flywheel_testing.wait import wait_for, wait_until
from flywheel_vision.model import EMBEDDING_SIZE
from flywheel_vision.preprocess import EMBEDDING_NAME, INPUT_NAME, INPUT_SHAPE, OUTPUT_NAME

pytestmark = pytest.mark.integration

PYTHON = ServingOptions(flavour="python")


@pytest.fixture
async def control(triton_server: TritonServer) -> AsyncIterator[TritonControl]:
    async with TritonControl(triton_server.http_url) as built:
        yield built


@pytest.fixture
async def model_name(control: TritonControl) -> AsyncIterator[str]:
    """A model name of this test's own, unloaded afterwards so the session's server stays lean."""
    name = f"digits-{uuid.uuid4().hex[:8]}"
    yield name
    await control.unload(name)


def _images(count: int, seed: int = 0) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal((count, *INPUT_SHAPE)).astype(np.float32)


def _expected(seed: int, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    session = ort.InferenceSession(digit_onnx(seed), providers=["CPUExecutionProvider"])
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images})
    return np.asarray(logits, dtype=np.float32)


async def _infer(
    client: http_aio.InferenceServerClient,
    model: str,
    version: str,
    images: npt.NDArray[np.float32],
) -> npt.NDArray[np.float32]:
    tensor = InferInput(INPUT_NAME, list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=True)
    result = await client.infer(
        model,
        [tensor],
        model_version=version,
        outputs=[InferRequestedOutput(OUTPUT_NAME, binary_data=True)],
    )
    logits = result.as_numpy(OUTPUT_NAME)
    assert logits is not None
    return np.asarray(logits)


async def _infer_outputs(
    client: http_aio.InferenceServerClient,
    model: str,
    version: str,
    images: npt.NDArray[np.float32],
    outputs: list[str],
) -> dict[str, npt.NDArray[np.float32] | None]:
    tensor = InferInput(INPUT_NAME, list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=True)
    result = await client.infer(
        model,
        [tensor],
        model_version=version,
        outputs=[InferRequestedOutput(name, binary_data=True) for name in outputs],
    )
    return {name: result.as_numpy(name) for name in outputs}


def _versions(name: str, seeds: dict[str, int]) -> list[ModelFiles]:
    return [digit_model_files(name, version, seed) for version, seed in seeds.items()]


async def test_two_versions_are_served_side_by_side_as_onnxruntime_computes_them(
    triton_server: TritonServer, control: TritonControl, model_name: str
) -> None:
    build_model_repository(
        triton_server.repository, model_name, _versions(model_name, {"1": 1, "2": 2}), PYTHON
    )
    images = _images(5)

    await control.load(model_name)
    async with http_aio.InferenceServerClient(triton_server.http_url) as client:
        first = await _infer(client, model_name, "1", images)
        second = await _infer(client, model_name, "2", images)

    assert await control.model_ready(model_name, "1")
    assert await control.model_ready(model_name, "2")
    assert first.shape == (5, 10)
    assert np.allclose(first, _expected(1, images), atol=1e-5)
    assert np.allclose(second, _expected(2, images), atol=1e-5)
    assert not np.allclose(first, second, atol=1e-3)


async def test_a_request_for_logits_and_embedding_gets_both_from_the_version_it_names(
    triton_server: TritonServer, control: TritonControl, model_name: str
) -> None:
    model_dir = build_model_repository(
        triton_server.repository, model_name, _versions(model_name, {"1": 1, "2": 2}), PYTHON
    )
    images = _images(4)
    session = ort.InferenceSession(digit_onnx(2), providers=["CPUExecutionProvider"])
    logits, embedding = session.run([OUTPUT_NAME, EMBEDDING_NAME], {INPUT_NAME: images})

    await control.load(model_name)
    async with http_aio.InferenceServerClient(triton_server.http_url) as client:
        both = await _infer_outputs(client, model_name, "2", images, [OUTPUT_NAME, EMBEDDING_NAME])
        only_logits = await _infer_outputs(client, model_name, "1", images[:1], [OUTPUT_NAME])
        metadata = await client.get_model_metadata(model_name, model_version="2")

    assert 'name: "embedding"' in (model_dir / "config.pbtxt").read_text()
    assert {output["name"] for output in metadata["outputs"]} == {OUTPUT_NAME, EMBEDDING_NAME}
    assert both[OUTPUT_NAME] is not None
    assert both[EMBEDDING_NAME] is not None
    assert both[OUTPUT_NAME].shape == (4, 10)
    assert both[EMBEDDING_NAME].shape == (4, EMBEDDING_SIZE)
    assert np.allclose(both[OUTPUT_NAME], logits, atol=1e-5)
    assert np.allclose(both[EMBEDDING_NAME], embedding, atol=1e-5)
    assert only_logits[OUTPUT_NAME] is not None
    assert only_logits[OUTPUT_NAME].shape == (1, 10)


async def test_a_model_without_embedding_is_served_without_that_output(
    triton_server: TritonServer, control: TritonControl, model_name: str
) -> None:
    # A version of before embeddings beside one with: the config declares logits only.
    versions = [
        digit_model_files(model_name, "1", seed=1, embedding=False),
        digit_model_files(model_name, "2", seed=2),
    ]
    model_dir = build_model_repository(triton_server.repository, model_name, versions, PYTHON)
    images = _images(3)

    await control.load(model_name)
    async with http_aio.InferenceServerClient(triton_server.http_url) as client:
        first = await _infer(client, model_name, "1", images)
        second = await _infer(client, model_name, "2", images)
        metadata = await client.get_model_metadata(model_name, model_version="1")

    assert "embedding" not in (model_dir / "config.pbtxt").read_text()
    assert [output["name"] for output in metadata["outputs"]] == [OUTPUT_NAME]
    assert np.allclose(first, _expected(1, images), atol=1e-5)
    assert np.allclose(second, _expected(2, images), atol=1e-5)


async def test_concurrent_requests_of_any_size_each_get_their_own_rows(
    triton_server: TritonServer, control: TritonControl, model_name: str
) -> None:
    build_model_repository(
        triton_server.repository, model_name, _versions(model_name, {"1": 7}), PYTHON
    )
    await control.load(model_name)
    batches = [_images(size, seed=size) for size in (1, 4, 2, 3, 1, 8, 5, 2)]

    async with http_aio.InferenceServerClient(triton_server.http_url) as client:
        answers = await asyncio.gather(
            *(_infer(client, model_name, "1", batch) for batch in batches)
        )

    for batch, answer in zip(batches, answers, strict=True):
        assert np.allclose(answer, _expected(7, batch), atol=1e-5)


async def test_a_new_version_goes_into_service_without_restarting_or_dropping_requests(
    triton_server: TritonServer, control: TritonControl, model_name: str
) -> None:
    pid = triton_server.pid
    repository = triton_server.repository
    build_model_repository(repository, model_name, _versions(model_name, {"1": 1, "2": 2}), PYTHON)
    await control.load(model_name)
    images = _images(3)
    expected_second = _expected(2, images)

    build_model_repository(repository, model_name, _versions(model_name, {"2": 2, "3": 3}), PYTHON)
    async with http_aio.InferenceServerClient(triton_server.http_url) as client:
        reload = asyncio.create_task(control.load(model_name))
        during: list[npt.NDArray[np.float32]] = []
        while not reload.done():  # version 2 stays in service while Triton reloads the model
            during.append(await _infer(client, model_name, "2", images))
        await reload
        third = await _infer(client, model_name, "3", images)
        second = await _infer(client, model_name, "2", images)
    index = [e for e in await control.repository_index() if e.name == model_name]

    assert triton_server.pid == pid
    assert triton_server.running
    assert during
    assert all(np.allclose(answer, expected_second, atol=1e-5) for answer in during)
    assert np.allclose(third, _expected(3, images), atol=1e-5)
    assert np.allclose(second, expected_second, atol=1e-5)
    assert await control.model_ready(model_name, "3")
    assert not await control.model_ready(model_name, "1")
    assert sorted((e.version, e.state) for e in index if e.state == "READY") == [
        ("2", "READY"),
        ("3", "READY"),
    ]


async def test_an_unloaded_model_is_no_longer_ready(
    triton_server: TritonServer, control: TritonControl, model_name: str
) -> None:
    build_model_repository(
        triton_server.repository, model_name, _versions(model_name, {"1": 1}), PYTHON
    )
    await control.load(model_name)
    await control.wait_model_ready(model_name, "1", timeout=10)

    await control.unload(model_name)

    await wait_for(lambda: _not_ready(control, model_name), timeout=30, message="model unloaded")
    assert not await control.model_ready(model_name, "1")


async def _not_ready(control: TritonControl, model: str) -> bool:
    return not await control.model_ready(model)


async def test_a_corrupt_onnx_fails_the_load_with_tritons_reason(
    triton_server: TritonServer, control: TritonControl, model_name: str
) -> None:
    corrupt = ModelFiles(name=model_name, version="1", onnx=b"not an onnx graph", labels=["a"])
    build_model_repository(triton_server.repository, model_name, [corrupt], PYTHON)

    with pytest.raises(ModelLoadError) as raised:
        await control.load(model_name)

    assert raised.value.code == "model_load_failed"
    assert model_name in raised.value.message
    assert "INVALID_PROTOBUF" in raised.value.message
    assert raised.value.details["model"] == model_name
    assert not await control.model_ready(model_name)
    assert await control.server_ready()  # one bad model does not take the server out


async def test_the_grpc_control_loads_lists_and_unloads(
    triton_server: TritonServer, model_name: str
) -> None:
    build_model_repository(
        triton_server.repository, model_name, _versions(model_name, {"4": 4}), PYTHON
    )

    async with TritonControl(triton_server.grpc_url, protocol="grpc") as control:
        assert await control.server_ready()
        await control.load(model_name)
        ready = await control.model_ready(model_name, "4")
        index = [e for e in await control.repository_index() if e.name == model_name]
        await control.unload(model_name)
        await wait_for(lambda: _not_ready(control, model_name), timeout=30)
        missing = await control.model_ready(f"{model_name}-missing")
        with pytest.raises(ModelLoadError):
            await control.load(f"{model_name}-missing")

    assert ready
    assert [(e.version, e.state) for e in index] == [("4", "READY")]
    assert not missing


def test_a_server_that_exits_while_starting_reports_its_log(tmp_path: Path) -> None:
    with pytest.raises(TritonStartError, match="exited") as raised:
        TritonServer.start(tmp_path, extra_args=["--load-model=missing"])

    assert "failed to poll model 'missing'" in raised.value.message
    assert "failed to load all models" in raised.value.message


def test_a_server_started_on_chosen_ports_stops_with_its_backend_stubs(tmp_path: Path) -> None:
    http_port, grpc_port, metrics_port = free_ports(3)

    with TritonServer.start(
        tmp_path, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port
    ) as server:
        pid = server.pid
        urls = (server.http_url, server.grpc_url, server.metrics_url)

    assert urls == (
        f"127.0.0.1:{http_port}",
        f"127.0.0.1:{grpc_port}",
        f"http://127.0.0.1:{metrics_port}/metrics",
    )
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


def test_the_command_serves_in_the_foreground_until_terminated(tmp_path: Path) -> None:
    http_port, grpc_port, metrics_port = free_ports(3)
    command = [
        sys.executable,
        "-m",
        "flywheel_serving.triton",
        "--repository",
        str(tmp_path / "repository"),
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        "--metrics-port",
        str(metrics_port),
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            announced = process.stdout.readline()  # printed once Triton is live
            wait_until(lambda: _live(http_port), timeout=30, message="triton live")
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=60)
        finally:
            if process.poll() is None:  # let the command stop its Triton before giving up on it
                process.terminate()
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()

    assert f"http 127.0.0.1:{http_port}" in announced
    assert code == 0
    assert not _live(http_port)


def _live(port: int) -> bool:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/v2/health/live")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()
