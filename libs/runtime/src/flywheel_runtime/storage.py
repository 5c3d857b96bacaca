"""Object storage on any S3 server (MinIO, SeaweedFS, AWS) through the ``minio`` SDK.

The SDK is blocking, so every call runs in a worker thread (``asyncio.to_thread``) and the event
loop keeps serving while S3 answers. Its failures are translated into the platform's error
hierarchy: a server that does not answer or answers 5xx becomes ``DependencyUnavailableError``
(retryable, so the broker requeues), a missing object becomes ``NotFoundError``, and S3 refusing
our credentials or permissions becomes ``DependencyRefusedError`` (503, not retryable: our
configuration is wrong); services never see ``minio`` or ``urllib3`` exceptions.

Artifacts that are referenced from events are stored content-addressed (key = SHA-256 of the
bytes): writing the same upload twice yields the same key, which is what makes a redelivered
message harmless.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import io
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Final, TypeVar

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError
from pydantic import BaseModel, ConfigDict

from flywheel_runtime.errors import (
    DependencyRefusedError,
    DependencyUnavailableError,
    FlywheelError,
    InvalidInputError,
    NotFoundError,
)
from flywheel_runtime.settings import PlatformSettings

__all__ = [
    "DATA_BUCKET",
    "LOGS_BUCKET",
    "MODELS_BUCKET",
    "PLATFORM_BUCKETS",
    "ObjectStat",
    "ObjectStorage",
    "StoredObject",
]

DATA_BUCKET: Final = "flywheel-data"
"""Uploaded images and labelled data sets."""

MODELS_BUCKET: Final = "flywheel-models"
"""Exported models (ONNX, ``config.pbtxt``) and MLflow artifacts."""

LOGS_BUCKET: Final = "flywheel-logs"
"""Inference log batches (Parquet, partitioned by model line, date and hour)."""

PLATFORM_BUCKETS: Final[frozenset[str]] = frozenset({DATA_BUCKET, MODELS_BUCKET, LOGS_BUCKET})
"""Every bucket the platform expects; created at start-up with ``ensure_buckets``."""

_T = TypeVar("_T")

_NOT_FOUND_CODES: Final = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchObject"})
# Another creator won the race between our existence check and our create: the goal is reached.
_BUCKET_EXISTS_CODES: Final = frozenset({"BucketAlreadyOwnedByYou", "BucketAlreadyExists"})
# S3 refusing who we are or what we may do: wrong or expired keys, a signature made with the
# wrong secret, region or clock, a policy without the grant. 401 and 403 answers without one of
# these codes (a HEAD request has no body to name one) are refusals too.
_REFUSED_CODES: Final = frozenset(
    {
        "AccessDenied",
        "AccountProblem",
        "AllAccessDisabled",
        "AuthorizationHeaderMalformed",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidSecurity",
        "InvalidToken",
        "MissingSecurityHeader",
        "RequestTimeTooSkewed",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
    }
)
_REFUSED_STATUSES: Final = frozenset({401, 403})
_USER_METADATA_PREFIX: Final = "x-amz-meta-"


class StoredObject(BaseModel):
    """Where a write landed; ``created`` is false when identical content was already there."""

    model_config = ConfigDict(frozen=True)

    bucket: str
    key: str
    sha256: str
    size: int
    created: bool


class ObjectStat(BaseModel):
    """An object's properties, read without downloading it."""

    model_config = ConfigDict(frozen=True)

    bucket: str
    key: str
    size: int
    etag: str
    content_type: str | None
    last_modified: datetime | None
    metadata: dict[str, str]
    """User metadata, keys lower-cased and without the ``x-amz-meta-`` prefix."""


class ObjectStorage:
    """Async facade over one S3 endpoint; safe to share across tasks of one service."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        *,
        secure: bool = False,
        region: str | None = "us-east-1",
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        retries: int = 3,
        max_concurrency: int = 32,
    ) -> None:
        """Connect lazily to ``endpoint`` (``host:port``); nothing is sent until the first call.

        The SDK's own HTTP client waits five minutes per attempt and retries five times, so a
        dead S3 would hang a handler for half an hour; ours gives up within seconds and lets the
        caller's retry policy (broker redelivery, readiness probe) decide what happens next.
        A fixed ``region`` also spares the SDK a bucket-location request before each first use.
        Calls run on a thread pool of their own, ``max_concurrency`` wide with as many pooled
        connections: the default executor's handful of threads would cap S3 throughput.
        """
        self._endpoint = endpoint
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            maxsize=max_concurrency,
            retries=urllib3.Retry(
                total=retries,
                backoff_factor=0.2,
                status_forcelist=(500, 502, 503, 504),
            ),
        )
        self._executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="s3")
        self._client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=self._http,
        )

    @classmethod
    def from_settings(cls, platform: PlatformSettings) -> ObjectStorage:
        """Build the storage every service uses from its platform settings."""
        return cls(
            platform.s3_endpoint,
            platform.s3_access_key.get_secret_value(),
            platform.s3_secret_key.get_secret_value(),
            secure=platform.s3_secure,
            region=platform.s3_region,
        )

    @property
    def endpoint(self) -> str:
        """The ``host:port`` this storage talks to."""
        return self._endpoint

    def close(self) -> None:
        """Drop pooled connections and worker threads; call on shutdown."""
        self._http.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def ping(self) -> None:
        """Readiness check: a signed request proves the server answers and accepts our keys."""
        await self._run(self._client.list_buckets)

    async def ensure_buckets(self, *names: str) -> None:
        """Create each bucket unless it exists; several processes may run this at once."""
        for name in names:
            await self._run(functools.partial(self._ensure_bucket, name), bucket=name)

    async def put(
        self,
        bucket: str,
        key: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
    ) -> StoredObject:
        """Store ``data`` under ``key``, replacing whatever was there."""
        digest = hashlib.sha256(data).hexdigest()
        await self._run(
            lambda: self._put(bucket, key, data, content_type, metadata),
            bucket=bucket,
            key=key,
        )
        return StoredObject(bucket=bucket, key=key, sha256=digest, size=len(data), created=True)

    async def put_content_addressed(
        self,
        bucket: str,
        data: bytes,
        *,
        content_type: str,
        prefix: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> StoredObject:
        """Store ``data`` under ``prefix + sha256(data)``, uploading only if it is not there yet.

        Two writers racing on the same bytes may both upload; they write identical content to
        the same key, so the outcome is the same and no lock is needed.
        """
        digest = hashlib.sha256(data).hexdigest()
        key = f"{prefix}{digest}"
        if await self.exists(bucket, key):
            return StoredObject(
                bucket=bucket, key=key, sha256=digest, size=len(data), created=False
            )
        return await self.put(bucket, key, data, content_type=content_type, metadata=metadata)

    async def get(self, bucket: str, key: str) -> bytes:
        """The object's bytes; ``NotFoundError`` if the key (or bucket) does not exist."""
        return await self._run(lambda: self._get(bucket, key), bucket=bucket, key=key)

    async def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key under ``prefix``, at any depth; ``NotFoundError`` if the bucket is missing."""

        def keys() -> list[str]:
            found = self._client.list_objects(bucket, prefix=prefix, recursive=True)
            return [item.object_name for item in found if item.object_name is not None]

        return await self._run(keys, bucket=bucket)

    async def delete_many(self, bucket: str, keys: Sequence[str]) -> None:
        """Delete ``keys`` (missing ones are fine); ``FlywheelError`` if the store kept any."""

        def call() -> list[str]:
            # remove_objects is lazy: the deletions happen while its error iterator is consumed.
            errors = self._client.remove_objects(bucket, (DeleteObject(key) for key in keys))
            return [f"{error.name}: {error.message}" for error in errors]

        failed = await self._run(call, bucket=bucket)
        if failed:
            raise FlywheelError(
                "object storage kept objects that were to be deleted",
                details={"bucket": bucket, "failed": failed[:5]},
            )

    async def exists(self, bucket: str, key: str) -> bool:
        """Whether ``key`` exists in ``bucket``."""
        try:
            await self.stat(bucket, key)
        except NotFoundError:
            return False
        return True

    async def stat(self, bucket: str, key: str) -> ObjectStat:
        """Size, ETag, content type and user metadata of an object; ``NotFoundError`` if none."""
        info = await self._run(
            lambda: self._client.stat_object(bucket, key), bucket=bucket, key=key
        )
        metadata = {
            name.lower().removeprefix(_USER_METADATA_PREFIX): value
            for name, value in (info.metadata or {}).items()
            if name.lower().startswith(_USER_METADATA_PREFIX)
        }
        return ObjectStat(
            bucket=bucket,
            key=key,
            size=info.size or 0,
            etag=info.etag or "",
            content_type=info.content_type,
            last_modified=info.last_modified,
            metadata=metadata,
        )

    async def presigned_get(self, bucket: str, key: str, expires: timedelta) -> str:
        """A URL that lets anyone holding it download the object until ``expires`` has passed."""
        return await self._run(
            lambda: self._client.presigned_get_object(bucket, key, expires=expires),
            bucket=bucket,
            key=key,
        )

    def _ensure_bucket(self, name: str) -> None:
        if self._client.bucket_exists(name):
            return
        try:
            self._client.make_bucket(name)
        except S3Error as exc:
            if exc.code not in _BUCKET_EXISTS_CODES:
                raise

    def _put(
        self,
        bucket: str,
        key: str,
        data: bytes,
        content_type: str,
        metadata: Mapping[str, str] | None,
    ) -> None:
        self._client.put_object(
            bucket,
            key,
            io.BytesIO(data),
            length=len(data),
            content_type=content_type,
            metadata=dict(metadata) if metadata else None,
        )

    def _get(self, bucket: str, key: str) -> bytes:
        response = self._client.get_object(bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    async def _run(
        self, call: Callable[[], _T], *, bucket: str | None = None, key: str | None = None
    ) -> _T:
        """Run a blocking SDK call in a thread and translate its failures into ours."""
        # Details reach HTTP clients, so they name the caller's bucket and key, never our host.
        details = {name: value for name, value in (("bucket", bucket), ("key", key)) if value}
        try:
            context = contextvars.copy_context()
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, context.run, call)
        except S3Error as exc:
            if exc.code in _NOT_FOUND_CODES:
                raise NotFoundError(
                    "object not found" if exc.code == "NoSuchKey" else "bucket not found",
                    details=details,
                ) from exc
            if exc.response.status >= 500:
                raise DependencyUnavailableError(
                    "object storage failed", details=details | {"s3_code": exc.code}
                ) from exc
            if exc.code in _REFUSED_CODES or exc.response.status in _REFUSED_STATUSES:
                # Only the S3 code: the server's own message may name our host or access key.
                raise DependencyRefusedError(
                    f"object storage refused the request ({exc.code}): check the service's S3 "
                    "credentials and permissions",
                    details=details | {"s3_code": exc.code},
                ) from exc
            # Any other 4xx is a request we should not have sent: our bug, a plain 500.
            raise FlywheelError(
                f"object storage rejected the request ({exc.code})",
                details=details | {"s3_code": exc.code},
            ) from exc
        except (ServerError, InvalidResponseError, urllib3.exceptions.HTTPError) as exc:
            # Unreachable, timed out, 5xx after retries, or not an S3 server at all (a proxy's
            # error page): all things that may heal without any change on our side.
            raise DependencyUnavailableError(
                "object storage is unavailable", details=details
            ) from exc
        except ValueError as exc:
            # The SDK validates bucket names, keys and expiry locally before sending anything.
            raise InvalidInputError(str(exc), details=details) from exc
