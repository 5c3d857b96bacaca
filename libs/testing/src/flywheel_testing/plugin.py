"""Pytest plugin (entry point ``flywheel``): real-server fixtures for every Flywheel test suite.

Servers come from env (``FLYWHEEL_TEST_*``), else from testcontainers when a Docker engine
answers, else from this machine (RabbitMQ and PostgreSQL) or a subprocess (SeaweedFS S3).
Names are uuid-suffixed so tests never see each other's messages or rows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from flywheel_runtime.topology import Topology
from flywheel_testing.fixtures_mlflow import mlflow_server, mlflow_tracking_uri
from flywheel_testing.fixtures_s3 import new_bucket_name, s3_server, storage, unique_bucket
from flywheel_testing.fixtures_triton import triton_server
from flywheel_testing.kubeapi import kube_api as kube_api
from flywheel_testing.postgres import postgres_server, sqlalchemy_url, throwaway_database
from flywheel_testing.rabbit import delete_names, rabbit_server, unique_namespace

__all__ = [
    "database_url",
    "mlflow_server",
    "mlflow_tracking_uri",
    "new_bucket_name",
    "postgres_admin_url",
    "postgres_dsn",
    "rabbit_url",
    "s3_server",
    "storage",
    "topology",
    "triton_server",
    "unique_bucket",
]


@pytest.fixture(scope="session")
def rabbit_url() -> Iterator[str]:
    with rabbit_server() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
async def postgres_dsn(postgres_admin_url: str) -> AsyncIterator[str]:
    """A database of its own for this test session (asyncpg DSN)."""
    async with throwaway_database(postgres_admin_url) as dsn:
        yield dsn


@pytest.fixture(scope="session")
def database_url(postgres_dsn: str) -> str:
    """The session's throwaway database as a SQLAlchemy asyncpg URL."""
    return sqlalchemy_url(postgres_dsn)


@pytest.fixture
async def topology(rabbit_url: str) -> AsyncIterator[Topology]:
    """A topology under a fresh namespace; its queues and exchanges are deleted afterwards."""
    built = Topology(namespace=unique_namespace(), delivery_limit=3)
    yield built
    await delete_names(
        rabbit_url,
        queues=built.queue_names,
        exchanges=[
            built.events_exchange.name,
            built.inference_exchange.name,
            built.dead_letter_exchange.name,
        ],
    )
