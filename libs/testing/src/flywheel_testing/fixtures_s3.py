"""Pytest fixtures for S3: one server per session, a fresh bucket per test.

Import them where they are needed (the plugin, a ``conftest.py``) by the names in ``__all__``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from minio import Minio
from minio.deleteobjects import DeleteObject

from flywheel_runtime.storage import ObjectStorage
from flywheel_testing.s3 import S3Server, s3_for_tests

__all__ = ["new_bucket_name", "s3_server", "storage", "unique_bucket"]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """The session's S3: ``FLYWHEEL_TEST_S3_*``, else MinIO in Docker, else SeaweedFS."""
    with s3_for_tests(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def storage(s3_server: S3Server) -> Iterator[ObjectStorage]:
    """An ``ObjectStorage`` on the session's server that gives up fast when it is gone."""
    built = ObjectStorage(
        s3_server.endpoint,
        s3_server.access_key,
        s3_server.secret_key,
        connect_timeout_s=2.0,
        read_timeout_s=10.0,
        retries=1,
    )
    yield built
    built.close()


@pytest.fixture
def new_bucket_name(s3_server: S3Server) -> Iterator[str]:
    """A bucket name no other test uses, not yet created; removed with its objects afterwards."""
    name = f"flywheel-test-{uuid.uuid4().hex[:16]}"
    yield name
    _remove_bucket(s3_server, name)


@pytest.fixture
async def unique_bucket(storage: ObjectStorage, new_bucket_name: str) -> str:
    """A fresh, empty bucket for one test."""
    await storage.ensure_buckets(new_bucket_name)
    return new_bucket_name


def _remove_bucket(server: S3Server, name: str) -> None:
    # MinIO refuses to delete a non-empty bucket, so empty it first; on a shared server
    # (FLYWHEEL_TEST_S3_ENDPOINT) test buckets would otherwise pile up.
    client = Minio(server.endpoint, server.access_key, server.secret_key, secure=False)
    if not client.bucket_exists(name):
        return
    doomed = (DeleteObject(item.object_name) for item in client.list_objects(name, recursive=True))
    errors = list(client.remove_objects(name, doomed))
    if errors:
        raise RuntimeError(f"could not empty test bucket {name}: {errors[:3]}")
    client.remove_bucket(name)
