import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from flywheel_inference_bff.adapters.triton import TritonInference, _translate
from flywheel_inference_bff.errors import (
    InferenceUnavailableError,
    InferenceUnreachableError,
    ModelNotReadyError,
    ModelUnusableError,
)
from flywheel_testing.net import free_port

DETAILS = {"model": "digits", "version": "3"}


@pytest.mark.parametrize(
    ("message", "status", "expected"),
    [
        ("Request for unknown model: 'digits' is not found", "400", ModelNotReadyError),
        (
            "Request for unknown model: 'digits' version 3 is not at ready state",
            "400",
            ModelNotReadyError,
        ),
        (
            "Request for unknown model: 'digits' has no available versions",
            "StatusCode.UNAVAILABLE",
            ModelNotReadyError,
        ),
        ("failed to connect to all addresses", "StatusCode.UNAVAILABLE", InferenceUnreachableError),
        ("internal failure", "500", InferenceUnavailableError),
        ("Server is stopping", "503", InferenceUnavailableError),
        ("stub crashed", None, InferenceUnavailableError),
        ("unexpected shape for input 'image'", "400", ModelUnusableError),
        ("inference request for unknown input", "StatusCode.INVALID_ARGUMENT", ModelUnusableError),
    ],
)
def test_triton_answers_become_the_platforms_errors(
    message: str, status: str | None, expected: type[Exception]
) -> None:
    error = _translate(InferenceServerException(msg=message, status=status), dict(DETAILS))

    assert type(error) is expected
    assert message not in error.message  # Triton's words go to the log, not to the client
    assert error.details == DETAILS


@pytest.mark.parametrize("protocol", ["http", "grpc"])
async def test_a_server_that_is_not_there_is_unavailable(protocol: str) -> None:
    triton = TritonInference(f"127.0.0.1:{free_port()}", protocol=protocol, timeout_s=2)  # type: ignore[arg-type]
    images = np.zeros((1, 1, 28, 28), dtype=np.float32)

    with pytest.raises(InferenceUnreachableError) as refused:
        await triton.infer("digits", "1", images)
    with pytest.raises(InferenceUnreachableError):
        await triton.ready()
    await triton.close()

    assert refused.value.http_status == 503
    assert refused.value.code == "inference_unavailable"
    assert refused.value.retryable
