import asyncio
import hashlib
import time
from datetime import timedelta

import httpx
import pytest
from minio import Minio
from pydantic import SecretStr

from flywheel_runtime.errors import (
    DependencyRefusedError,
    DependencyUnavailableError,
    InvalidInputError,
    NotFoundError,
)
from flywheel_runtime.settings import PlatformSettings
from flywheel_runtime.storage import ObjectStorage
from flywheel_testing.net import free_port
from flywheel_testing.s3 import S3Server

pytestmark = pytest.mark.integration


async def test_put_then_get_returns_the_same_bytes(
    storage: ObjectStorage, unique_bucket: str
) -> None:
    data = b"\x00\x01 a small png, honestly \xff"

    stored = await storage.put(unique_bucket, "images/a.png", data, content_type="image/png")

    assert await storage.get(unique_bucket, "images/a.png") == data
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.size == len(data)


async def test_same_bytes_stored_twice_make_one_content_addressed_object(
    storage: ObjectStorage, unique_bucket: str, s3_server: S3Server
) -> None:
    data = b"the same upload, delivered twice"
    digest = hashlib.sha256(data).hexdigest()

    first = await storage.put_content_addressed(
        unique_bucket, data, content_type="text/plain", prefix="uploads/"
    )
    second = await storage.put_content_addressed(
        unique_bucket, data, content_type="text/plain", prefix="uploads/"
    )

    assert first.key == second.key == f"uploads/{digest}"
    assert (first.created, second.created) == (True, False)
    assert first.sha256 == second.sha256 == digest
    client = Minio(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, secure=False)
    listed = await asyncio.to_thread(
        lambda: [item.object_name for item in client.list_objects(unique_bucket, recursive=True)]
    )
    assert listed == [f"uploads/{digest}"]


async def test_exists_and_stat_describe_a_stored_object(
    storage: ObjectStorage, unique_bucket: str
) -> None:
    data = b'{"label": 7}'
    await storage.put(
        unique_bucket,
        "labels/1.json",
        data,
        content_type="application/json",
        metadata={"Source": "labeling"},
    )

    stat = await storage.stat(unique_bucket, "labels/1.json")

    assert await storage.exists(unique_bucket, "labels/1.json")
    assert not await storage.exists(unique_bucket, "labels/2.json")
    assert stat.size == len(data)
    assert stat.etag
    assert stat.content_type == "application/json"
    assert stat.metadata == {"source": "labeling"}


async def test_missing_key_raises_not_found(storage: ObjectStorage, unique_bucket: str) -> None:
    with pytest.raises(NotFoundError):
        await storage.get(unique_bucket, "nothing-here")
    with pytest.raises(NotFoundError):
        await storage.stat(unique_bucket, "nothing-here")


async def test_missing_bucket_raises_not_found(
    storage: ObjectStorage, new_bucket_name: str
) -> None:
    with pytest.raises(NotFoundError):
        await storage.get(new_bucket_name, "anything")


async def test_invalid_bucket_name_raises_invalid_input(storage: ObjectStorage) -> None:
    with pytest.raises(InvalidInputError):
        await storage.ensure_buckets("No_Such_Name!")


async def test_presigned_get_downloads_the_bytes(
    storage: ObjectStorage, unique_bucket: str
) -> None:
    data = b"model bytes behind a presigned URL"
    await storage.put(unique_bucket, "models/m.onnx", data)

    url = await storage.presigned_get(unique_bucket, "models/m.onnx", timedelta(minutes=5))
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url)

    assert response.status_code == 200
    assert response.content == data


async def test_ensure_buckets_is_idempotent_under_concurrent_callers(
    storage: ObjectStorage, new_bucket_name: str
) -> None:
    await asyncio.gather(*(storage.ensure_buckets(new_bucket_name) for _ in range(5)))
    await storage.ensure_buckets(new_bucket_name)

    await storage.put(new_bucket_name, "k", b"v")
    assert await storage.get(new_bucket_name, "k") == b"v"


async def test_from_settings_talks_to_the_configured_server(s3_server: S3Server) -> None:
    platform = PlatformSettings(
        s3_endpoint=s3_server.endpoint,
        s3_access_key=SecretStr(s3_server.access_key),
        s3_secret_key=SecretStr(s3_server.secret_key),
    )
    storage = ObjectStorage.from_settings(platform)
    try:
        await storage.ping()
    finally:
        storage.close()


async def test_wrong_secret_is_a_permanent_error_not_unavailability(s3_server: S3Server) -> None:
    storage = ObjectStorage(s3_server.endpoint, s3_server.access_key, "not-the-secret")
    try:
        with pytest.raises(DependencyRefusedError) as raised:
            await storage.ping()
    finally:
        storage.close()

    assert not isinstance(raised.value, DependencyUnavailableError)
    assert not raised.value.retryable
    assert raised.value.http_status == 503
    assert raised.value.details["s3_code"] == "SignatureDoesNotMatch"
    assert "SignatureDoesNotMatch" in raised.value.message
    shown = raised.value.message + str(raised.value.to_body())
    assert s3_server.endpoint not in shown
    assert s3_server.access_key not in shown
    assert "not-the-secret" not in shown


async def test_unknown_access_key_is_refused_by_its_s3_code(
    s3_server: S3Server, unique_bucket: str
) -> None:
    storage = ObjectStorage(s3_server.endpoint, "no-such-access-key", s3_server.secret_key)
    try:
        with pytest.raises(DependencyRefusedError) as raised:
            await storage.put(unique_bucket, "k", b"v")
    finally:
        storage.close()

    assert raised.value.details["s3_code"] == "InvalidAccessKeyId"
    assert "no-such-access-key" not in raised.value.message + str(raised.value.to_body())


async def test_unreachable_endpoint_raises_dependency_unavailable_quickly() -> None:
    storage = ObjectStorage(
        f"127.0.0.1:{free_port()}", "key", "secret", connect_timeout_s=1.0, retries=0
    )
    started = time.monotonic()
    try:
        with pytest.raises(DependencyUnavailableError) as raised:
            await storage.get("flywheel-data", "anything")
        with pytest.raises(DependencyUnavailableError):
            await storage.ping()
    finally:
        storage.close()

    assert time.monotonic() - started < 5
    assert raised.value.retryable
