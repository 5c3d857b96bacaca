"""MLflow for tests: a real ``mlflow server`` on PostgreSQL and S3, started as a subprocess.

The server gets a database of its own (created here, dropped afterwards) and proxies artifacts
to ``s3://<bucket>/mlflow`` (``--serve-artifacts``), so clients log and download artifacts over
HTTP through ``mlflow-artifacts:/`` and need neither S3 credentials nor ``boto3``; only the
server talks to S3.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject

from flywheel_testing.net import LOCALHOST, free_port
from flywheel_testing.s3 import S3Server

__all__ = [
    "ENV_MLFLOW_URI",
    "MlflowServer",
    "MlflowStartError",
    "find_mlflow",
    "mlflow_database",
    "mlflow_for_tests",
    "run_mlflow_server",
]

ENV_MLFLOW_URI = "FLYWHEEL_TEST_MLFLOW_URI"

ARTIFACTS_PREFIX = "mlflow"
"""Key prefix of MLflow's artifacts inside the bucket."""


@dataclass(frozen=True)
class MlflowServer:
    """Where a running MLflow server answers and where it keeps artifacts."""

    tracking_uri: str
    """``http://host:port``, for ``mlflow.set_tracking_uri`` and ``MlflowClient``."""
    artifacts_destination: str
    """``s3://bucket/prefix`` the server proxies artifacts to (empty for a reused server)."""
    pid: int | None = None
    """Process (and process group) id of a server started here; None for a reused one."""


class MlflowStartError(RuntimeError):
    """``mlflow server`` exited or did not answer ``/health`` in time; carries its output."""


class _ExitedError(MlflowStartError):
    """The server quit while starting, typically because its port was taken meanwhile."""


def find_mlflow() -> Path:
    """The ``mlflow`` console script of this environment, else one on PATH.

    The one beside ``sys.executable`` runs with this interpreter's packages (the store
    drivers, ``boto3``), which an unrelated ``mlflow`` on PATH might lack.
    """
    beside_python = Path(sys.executable).parent / "mlflow"
    if beside_python.is_file():
        return beside_python
    if found := shutil.which("mlflow"):
        return Path(found)
    raise FileNotFoundError("no `mlflow` command: install the mlflow package (server)")


@contextlib.contextmanager
def mlflow_database(admin_url: str) -> Iterator[str]:
    """Create a uniquely named database; yield its ``postgresql+psycopg2`` URL; drop it after.

    ``admin_url`` is a libpq URL (``postgresql://user@host:port/postgres``). The store URL
    names psycopg2 explicitly: with a bare ``postgresql://`` SQLAlchemy 2.1 picks psycopg 3.
    """
    name = f"flywheel_mlflow_{uuid.uuid4().hex[:12]}"
    _admin_execute(admin_url, f'CREATE DATABASE "{name}"')
    parts = urlsplit(admin_url)
    url = urlunsplit(("postgresql+psycopg2", parts.netloc, f"/{name}", parts.query, ""))
    try:
        yield url
    finally:
        _admin_execute(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _admin_execute(admin_url: str, statement: str) -> None:
    # CREATE/DROP DATABASE cannot run inside a transaction block.
    connection = psycopg2.connect(admin_url)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(statement)
    finally:
        connection.close()


@contextlib.contextmanager
def run_mlflow_server(
    workdir: Path,
    *,
    backend_store_uri: str,
    artifacts_destination: str,
    s3: S3Server,
    startup_timeout_s: float = 90.0,
    stop_timeout_s: float = 15.0,
    attempts: int = 3,
) -> Iterator[MlflowServer]:
    """Run ``mlflow server`` on a free port; stop it (and every worker it forked) on exit.

    A port picked free can be taken before the server binds it; the server then exits and the
    start is retried on a fresh port, up to ``attempts`` times.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        stack = contextlib.ExitStack()
        try:
            server = stack.enter_context(
                _start(
                    workdir,
                    backend_store_uri=backend_store_uri,
                    artifacts_destination=artifacts_destination,
                    s3=s3,
                    startup_timeout_s=startup_timeout_s,
                    stop_timeout_s=stop_timeout_s,
                )
            )
        except _ExitedError:
            if attempt == attempts:
                raise
            continue
        with stack:
            yield server
        return


@contextlib.contextmanager
def _start(
    workdir: Path,
    *,
    backend_store_uri: str,
    artifacts_destination: str,
    s3: S3Server,
    startup_timeout_s: float,
    stop_timeout_s: float,
) -> Iterator[MlflowServer]:
    """One start on one port, the server in a session of its own.

    Stopping then signals the whole process group: uvicorn's workers would otherwise outlive
    their parent.
    """
    port = free_port()
    command = [
        str(find_mlflow()),
        "server",
        "--host",
        LOCALHOST,
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts_destination,
    ]
    env = os.environ | {
        "MLFLOW_S3_ENDPOINT_URL": s3.url,
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        # The job runner (huey workers) triples the server's memory and Flywheel uses no jobs.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    output_path = workdir / f"mlflow-{port}.out"
    with output_path.open("wb") as output:
        process = subprocess.Popen(  # noqa: S603 - fixed program, arguments built here
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
            start_new_session=True,
        )
    server = MlflowServer(f"http://{LOCALHOST}:{port}", artifacts_destination, process.pid)
    try:
        _wait_until_healthy(process, server.tracking_uri, startup_timeout_s, output_path)
        yield server
    finally:
        _stop(process, stop_timeout_s)


def _wait_until_healthy(
    process: subprocess.Popen[bytes], tracking_uri: str, timeout_s: float, output_path: Path
) -> None:
    """Poll ``/health`` until it answers 200; fail early if the server exits."""
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=0.5, read=5.0), retries=urllib3.Retry(total=0)
    )
    deadline = time.monotonic() + timeout_s
    last: object = None
    try:
        while time.monotonic() < deadline:
            try:
                response = http.request("GET", f"{tracking_uri}/health")
            except urllib3.exceptions.HTTPError as exc:
                last = exc
            else:
                if response.status == 200:
                    return
                last = f"HTTP {response.status}"
            # Waiting on the process doubles as the poll interval and notices an early exit.
            try:
                code = process.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            raise _ExitedError(
                f"mlflow server exited with {code} before answering:\n{_tail(output_path)}"
            )
    finally:
        http.clear()
    raise MlflowStartError(
        f"mlflow server at {tracking_uri} not healthy within {timeout_s}s ({last!r}):\n"
        f"{_tail(output_path)}"
    )


def _stop(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM the server's process group, SIGKILL it if it has not exited in time."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    # A worker may linger after its parent exited; the group id outlives the leader.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _ensure_bucket(s3: S3Server, bucket: str) -> None:
    client = Minio(s3.endpoint, s3.access_key, s3.secret_key, secure=False)
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)


def _remove_bucket(s3: S3Server, bucket: str) -> None:
    # On a shared S3 (FLYWHEEL_TEST_S3_ENDPOINT) a bucket per session would pile up.
    client = Minio(s3.endpoint, s3.access_key, s3.secret_key, secure=False)
    if not client.bucket_exists(bucket):
        return
    doomed = (DeleteObject(o.object_name) for o in client.list_objects(bucket, recursive=True))
    errors = list(client.remove_objects(bucket, doomed))
    if errors:
        raise RuntimeError(f"could not empty MLflow test bucket {bucket}: {errors[:3]}")
    client.remove_bucket(bucket)


@contextlib.contextmanager
def mlflow_for_tests(
    workdir: Path, *, s3: S3Server, postgres_admin_url: str
) -> Iterator[MlflowServer]:
    """The MLflow in ``FLYWHEEL_TEST_MLFLOW_URI``, else a fresh server on its own database.

    A fresh server keeps artifacts in a bucket of its own on ``s3``; database and bucket are
    removed once the server has stopped.
    """
    if uri := os.environ.get(ENV_MLFLOW_URI):
        yield MlflowServer(uri.rstrip("/"), "")
        return
    bucket = f"flywheel-mlflow-{uuid.uuid4().hex[:12]}"
    _ensure_bucket(s3, bucket)
    try:
        with (
            mlflow_database(postgres_admin_url) as store_uri,
            run_mlflow_server(
                workdir,
                backend_store_uri=store_uri,
                artifacts_destination=f"s3://{bucket}/{ARTIFACTS_PREFIX}",
                s3=s3,
            ) as server,
        ):
            yield server
    finally:
        _remove_bucket(s3, bucket)
