"""``ReferenceStore`` on S3: drift references in the data bucket, where data-monitor reads them."""

from __future__ import annotations

import asyncio

from flywheel_runtime.drift_reference import (
    DEFAULT_PREFIX,
    DriftReference,
    encode_reference,
    reference_key,
)
from flywheel_runtime.storage import ObjectStorage


class S3ReferenceStore:
    """One ``.npz`` per version at ``reference_key(prefix, model line, version)``.

    The key depends on the version only, so writing it again (a redelivered event, a second
    validation of the same version) replaces it with the same content.
    """

    def __init__(
        self, storage: ObjectStorage, *, bucket: str, prefix: str = DEFAULT_PREFIX
    ) -> None:
        self._storage = storage
        self._bucket = bucket
        self._prefix = prefix

    async def put(self, model_line: str, version: str, reference: DriftReference) -> str:
        key = reference_key(self._prefix, model_line, version)
        data = await asyncio.to_thread(encode_reference, reference)
        await self._storage.put(self._bucket, key, data, content_type="application/octet-stream")
        return key
