"""The Triton model repository of each version, written where its KServe ``storageUri`` points.

KServe's Triton runtime downloads ``storageUri`` and starts Triton on it, so that prefix must
hold ``<registered_model>/config.pbtxt`` and the version's ``<n>/model.onnx`` before an
InferenceService names it. Each version gets a prefix of its own (the champion's stays intact
while a candidate rolls out, which is what a KServe rollback returns to), built from the
registry with the same builder the local Triton uses, only with the production backend.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import structlog

from flywheel_clients.registry import ModelRegistry
from flywheel_runtime.errors import InvalidInputError
from flywheel_runtime.storage import ObjectStorage
from flywheel_serving.repository import (
    CONFIG_FILE,
    ServingOptions,
    sync_from_registry,
    upload_repository,
)

log = structlog.get_logger(__name__)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` → ``("bucket", "some/prefix")``."""
    if not uri.startswith("s3://"):
        raise InvalidInputError("storageUri must be an s3:// URI", details={"storage_uri": uri})
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise InvalidInputError("storageUri names no bucket", details={"storage_uri": uri})
    return bucket, prefix.strip("/")


class S3VersionRepositories:
    """Publishes one version's Triton repository under its ``storageUri``, once.

    A version is immutable in the registry, so a repository whose ``config.pbtxt`` is already
    there (written last by ``upload_repository``) is complete and left alone, also after a
    restart of this service.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        storage: ObjectStorage,
        options: ServingOptions,
        *,
        work_dir: Path | None = None,
    ) -> None:
        self._registry = registry
        self._storage = storage
        self._options = options
        self._work_dir = work_dir
        self._published: set[str] = set()

    async def publish(self, registered_model: str, version: str, storage_uri: str) -> None:
        """Make ``storage_uri`` hold the repository of ``version`` alone."""
        if storage_uri in self._published:
            return
        bucket, prefix = split_s3_uri(storage_uri)
        config_key = "/".join(p for p in (prefix, registered_model, CONFIG_FILE) if p)
        if not await self._storage.exists(bucket, config_key):
            with tempfile.TemporaryDirectory(dir=self._work_dir) as folder:
                root = Path(folder)
                await sync_from_registry(
                    self._registry, registered_model, root, self._options, versions=[version]
                )
                await upload_repository(self._storage, bucket, prefix, root, registered_model)
            log.info(
                "model repository published",
                model=registered_model,
                version=version,
                storage_uri=storage_uri,
            )
        self._published.add(storage_uri)
