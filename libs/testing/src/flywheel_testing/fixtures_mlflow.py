"""Pytest fixtures for MLflow: one real server per session, fast-failing clients per test.

Import them where they are needed (the plugin, a ``conftest.py``) by the names in ``__all__``;
they need the ``s3_server`` and ``postgres_admin_url`` fixtures in scope too.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flywheel_testing.mlflow_server import MlflowServer, mlflow_for_tests
from flywheel_testing.s3 import S3Server

__all__ = ["mlflow_server", "mlflow_tracking_uri"]


@pytest.fixture(scope="session")
def mlflow_server(
    tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server, postgres_admin_url: str
) -> Iterator[MlflowServer]:
    """The session's MLflow: ``FLYWHEEL_TEST_MLFLOW_URI``, else a server on PostgreSQL + S3."""
    with mlflow_for_tests(
        tmp_path_factory.mktemp("mlflow"), s3=s3_server, postgres_admin_url=postgres_admin_url
    ) as server:
        yield server


@pytest.fixture
def mlflow_tracking_uri(mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """The tracking URI, with this process's MLflow clients pointed at it and failing fast.

    MLflow's client retries a failed request for minutes by default; a test wants the error.
    Subprocesses started by the test inherit the same environment.
    """
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.tracking_uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return mlflow_server.tracking_uri
