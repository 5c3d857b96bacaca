"""``Inference`` on Triton (or any KServe v2 server) through ``tritonclient``'s asyncio clients.

HTTP or gRPC, chosen by settings; tensors travel as binary data either way (HTTP's binary
extension, gRPC's raw contents), never as JSON number lists. The clients are created on the
running event loop the first time they are needed (aiohttp and grpc.aio bind to it).

Failures become the platform's errors: no connection → ``InferenceUnreachableError`` (no model saw
the request); Triton failing the request itself → ``InferenceUnavailableError``; Triton saying
the model or version is unknown or not ready → ``ModelNotReadyError``; past the timeout →
``InferenceTimeoutError``; anything else Triton refuses → ``ModelUnusableError`` (a deployment
fault: the served model does not take what its registered files say it takes). Triton's own
messages go to the log, not to the client.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

import aiohttp
import numpy as np
import numpy.typing as npt
import structlog
import tritonclient.grpc.aio as grpcclient
import tritonclient.http.aio as httpclient
from tritonclient.utils import InferenceServerException

from flywheel_inference_bff.errors import (
    InferenceTimeoutError,
    InferenceUnavailableError,
    InferenceUnreachableError,
    ModelNotReadyError,
    ModelUnusableError,
)
from flywheel_runtime.errors import FlywheelError
from flywheel_vision.preprocess import EMBEDDING_NAME, INPUT_NAME, OUTPUT_NAME

log = structlog.get_logger(__name__)

TritonProtocol = Literal["http", "grpc"]

# What Triton says (over HTTP 400 or gRPC NOT_FOUND/UNAVAILABLE) for a model or version that
# is not loaded: "Request for unknown model: 'm' is not found", "... version 3 is not at ready
# state", "... has no available versions".
_NOT_READY_MARKERS = ("unknown model", "not ready", "not at ready state", "no available versions")
_GRPC_UNREACHABLE = "StatusCode.UNAVAILABLE"
_UNAVAILABLE_STATUSES = frozenset(
    {
        "StatusCode.DEADLINE_EXCEEDED",
        "StatusCode.RESOURCE_EXHAUSTED",
        "StatusCode.CANCELLED",
        "StatusCode.INTERNAL",
        "StatusCode.UNKNOWN",
    }
)


_UNEXPECTED_OUTPUT = "unexpected inference output"
"""What Triton says when a request asks for an output its config does not declare."""
_NO_EMBEDDING_TTL_S = 5.0


class _EmbeddingNotServedError(Exception):
    """Triton refused the embedding output: the model's config does not declare it (yet)."""


class TritonInference:
    """One Triton endpoint; safe to share across the tasks of one event loop."""

    def __init__(
        self,
        url: str,
        *,
        protocol: TritonProtocol = "http",
        timeout_s: float = 5.0,
        connections: int = 256,
    ) -> None:
        self._url = url
        self._protocol = protocol
        self._timeout_s = timeout_s
        self._connections = connections
        self._client: httpclient.InferenceServerClient | grpcclient.InferenceServerClient | None
        self._client = None
        self._no_embedding: dict[str, float] = {}
        """Model → until when Triton is known not to serve its embedding output."""

    @property
    def protocol(self) -> TritonProtocol:
        return self._protocol

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def ready(self) -> None:
        """Readiness check: Triton answers and says it is ready."""
        try:
            ready = await asyncio.wait_for(self._get_client().is_server_ready(), self._timeout_s)
        except (aiohttp.ClientError, OSError) as error:
            raise InferenceUnreachableError("inference server is unreachable") from error
        except InferenceServerException as error:
            if _unreachable(error):
                raise InferenceUnreachableError("inference server is unreachable") from error
            raise InferenceUnavailableError("inference server is unavailable") from error
        except TimeoutError as error:
            raise InferenceUnavailableError("inference server is unavailable") from error
        if not ready:
            raise InferenceUnavailableError("inference server is not ready")

    async def infer(
        self, model: str, version: str, images: npt.NDArray[np.float32]
    ) -> npt.NDArray[np.float32]:
        logits, _ = await self.infer_embedded(model, version, images, embedding=False)
        return logits

    async def infer_embedded(
        self, model: str, version: str, images: npt.NDArray[np.float32], *, embedding: bool
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
        # Triton declares the embedding output only while every served version of the model
        # has one (a champion from before embeddings beside a candidate with one: it does
        # not). A refusal is remembered for a while and the request goes on without it.
        if embedding and time.monotonic() < self._no_embedding.get(model, 0.0):
            embedding = False
        try:
            return await self._infer(model, version, images, embedding=embedding)
        except _EmbeddingNotServedError:
            self._no_embedding[model] = time.monotonic() + _NO_EMBEDDING_TTL_S
            return await self._infer(model, version, images, embedding=False)

    async def _infer(
        self, model: str, version: str, images: npt.NDArray[np.float32], *, embedding: bool
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
        details = {"model": model, "version": version}
        client = self._get_client()
        names = (OUTPUT_NAME, EMBEDDING_NAME) if embedding else (OUTPUT_NAME,)
        inputs, outputs = self._tensors(images, names)
        try:
            # A deadline on this task, not wait_for: that would run the call as a task of its
            # own, a scheduling round trip per request.
            async with asyncio.timeout(self._timeout_s):
                result = await client.infer(model, inputs, model_version=version, outputs=outputs)
        except TimeoutError as error:
            raise InferenceTimeoutError(
                f"inference took longer than {self._timeout_s:g}s",
                retry_after_s=1,
                details=details,
            ) from error
        except InferenceServerException as error:
            if embedding and _UNEXPECTED_OUTPUT in str(error.message() or "").lower():
                raise _EmbeddingNotServedError from error
            raise _translate(error, details) from error
        except (aiohttp.ClientError, OSError) as error:
            raise InferenceUnreachableError(
                "inference server is unreachable", details=details
            ) from error
        logits = result.as_numpy(OUTPUT_NAME)
        if logits is None:
            raise ModelUnusableError(f"the model answered no {OUTPUT_NAME!r}", details=details)
        embedded = result.as_numpy(EMBEDDING_NAME) if embedding else None
        return (
            np.asarray(logits, dtype=np.float32),
            None if embedded is None else np.asarray(embedded, dtype=np.float32),
        )

    def _get_client(self) -> httpclient.InferenceServerClient | grpcclient.InferenceServerClient:
        if self._client is None:
            if self._protocol == "grpc":
                self._client = grpcclient.InferenceServerClient(self._url)
            else:
                self._client = httpclient.InferenceServerClient(
                    self._url, conn_limit=self._connections
                )
        return self._client

    def _tensors(
        self, images: npt.NDArray[np.float32], names: tuple[str, ...]
    ) -> tuple[list[Any], list[Any]]:
        batch = np.ascontiguousarray(images, dtype=np.float32)
        if self._protocol == "grpc":
            grpc_input = grpcclient.InferInput(INPUT_NAME, list(batch.shape), "FP32")
            grpc_input.set_data_from_numpy(batch)
            return [grpc_input], [grpcclient.InferRequestedOutput(name) for name in names]
        http_input = httpclient.InferInput(INPUT_NAME, list(batch.shape), "FP32")
        http_input.set_data_from_numpy(batch, binary_data=True)
        return [http_input], [
            httpclient.InferRequestedOutput(name, binary_data=True) for name in names
        ]


def _translate(error: InferenceServerException, details: dict[str, str]) -> FlywheelError:
    message = str(error.message() or "")
    status = str(error.status() or "")
    log.warning("inference server refused a request", status=status, reason=message, **details)
    lowered = message.lower()
    if any(marker in lowered for marker in _NOT_READY_MARKERS):
        return ModelNotReadyError(
            f"version {details['version']} of {details['model']!r} is not loaded",
            details=details,
        )
    if _unreachable(error):
        return InferenceUnreachableError("inference server is unreachable", details=details)
    if not status or status in _UNAVAILABLE_STATUSES or (status.isdigit() and int(status) >= 500):
        return InferenceUnavailableError("inference server failed", details=details)
    return ModelUnusableError("inference server refused the request", details=details)


def _unreachable(error: InferenceServerException) -> bool:
    # How grpc reports a connection it could not make or lost. Triton's own UNAVAILABLE means
    # it is stopping (as good as gone) or a queue is full, and no queue here has a size limit:
    # a slow version cannot pass its own failure off as the server's.
    return str(error.status() or "") == _GRPC_UNREACHABLE
