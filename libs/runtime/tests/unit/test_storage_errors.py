import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from flywheel_runtime.errors import (
    DependencyRefusedError,
    DependencyUnavailableError,
    FlywheelError,
    NotFoundError,
)
from flywheel_runtime.http import error_response
from flywheel_runtime.messaging import is_retryable
from flywheel_runtime.storage import ObjectStorage

ACCESS_KEY = "AKIAFLYWHEELUNITTEST"
SECRET_KEY = "a-secret-that-must-never-leak"


@dataclass
class Answer:
    status: int
    code: str


class _Handler(BaseHTTPRequestHandler):
    """Answers every request with the S3 error the test set (no body for HEAD, as S3 does)."""

    answer = Answer(200, "")

    def _reply(self, *, body: bool) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        payload = (
            f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{self.answer.code}</Code>"
            f"<Message>refused for {ACCESS_KEY} at {self.headers.get('Host')}</Message>"
            "<Resource>/</Resource><RequestId>1</RequestId><HostId>h</HostId></Error>"
        ).encode()
        self.send_response(self.answer.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(payload) if body else 0))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def do_GET(self) -> None:
        self._reply(body=True)

    def do_PUT(self) -> None:
        self._reply(body=True)

    def do_HEAD(self) -> None:
        self._reply(body=False)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.fixture(scope="module")
def fake_s3() -> Iterator[str]:
    """A local HTTP server playing an S3 that answers with ``_Handler.answer``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture
def storage(fake_s3: str) -> Iterator[ObjectStorage]:
    built = ObjectStorage(fake_s3, ACCESS_KEY, SECRET_KEY, retries=0, connect_timeout_s=2.0)
    yield built
    built.close()


def answering(status: int, code: str) -> None:
    _Handler.answer = Answer(status, code)


def leaks(error: FlywheelError, endpoint: str) -> list[str]:
    """Whatever of our host, port or keys the error would show an HTTP client."""
    shown = error.message + json.dumps(error.to_body())
    host, port = endpoint.rsplit(":", 1)
    return [secret for secret in (host, port, ACCESS_KEY, SECRET_KEY) if secret in shown]


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (403, "AccessDenied"),
        (403, "InvalidAccessKeyId"),
        (403, "SignatureDoesNotMatch"),
        (403, "RequestTimeTooSkewed"),
        (400, "AuthorizationHeaderMalformed"),
        (400, "ExpiredToken"),
    ],
)
async def test_s3_refusing_our_credentials_is_a_dependency_refused_503_not_retried(
    storage: ObjectStorage, fake_s3: str, status: int, code: str
) -> None:
    answering(status, code)

    with pytest.raises(DependencyRefusedError) as raised:
        await storage.get("flywheel-data", "images/ab/abc")

    error = raised.value
    assert error.code == "dependency_refused"
    assert error.http_status == 503
    assert not error.retryable
    assert not is_retryable(error)
    assert not isinstance(error, DependencyUnavailableError)
    assert "object storage refused the request" in error.message
    assert code in error.message
    assert error.details == {"bucket": "flywheel-data", "key": "images/ab/abc", "s3_code": code}
    assert leaks(error, fake_s3) == []
    rendered = error_response(error)
    assert rendered.status_code == 503
    assert json.loads(bytes(rendered.body))["error"]["code"] == "dependency_refused"


async def test_a_refusal_without_a_body_is_named_by_its_status(storage: ObjectStorage) -> None:
    answering(403, "")

    with pytest.raises(DependencyRefusedError) as on_head:
        await storage.exists("flywheel-data", "images/ab/abc")
    with pytest.raises(DependencyRefusedError) as on_put:
        await storage.put("flywheel-data", "k", b"bytes")

    assert on_head.value.details["s3_code"] == "AccessDenied"
    assert on_put.value.details["bucket"] == "flywheel-data"


async def test_a_refused_readiness_ping_names_the_s3_code_only(
    storage: ObjectStorage, fake_s3: str
) -> None:
    answering(403, "InvalidAccessKeyId")

    with pytest.raises(DependencyRefusedError) as raised:
        await storage.ping()

    assert raised.value.details == {"s3_code": "InvalidAccessKeyId"}
    assert leaks(raised.value, fake_s3) == []


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (404, "NoSuchKey", NotFoundError),
        (404, "NoSuchBucket", NotFoundError),
        (503, "SlowDown", DependencyUnavailableError),
        (500, "InternalError", DependencyUnavailableError),
        (400, "InvalidArgument", FlywheelError),
        (409, "OperationAborted", FlywheelError),
    ],
)
async def test_other_answers_keep_their_own_mapping(
    storage: ObjectStorage, status: int, code: str, expected: type[FlywheelError]
) -> None:
    answering(status, code)

    with pytest.raises(FlywheelError) as raised:
        await storage.get("flywheel-data", "images/ab/abc")

    assert type(raised.value) is expected
    assert not isinstance(raised.value, DependencyRefusedError)
