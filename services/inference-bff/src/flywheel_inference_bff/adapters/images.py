"""``Images`` and ``Results`` on S3: request images from the data bucket, job results as JSONL."""

from __future__ import annotations

from collections import OrderedDict

from flywheel_contracts.datasets import image_key
from flywheel_inference_bff.errors import (
    ImageNotFoundError,
    ImageSourceRefusedError,
    ImageTooLargeError,
)
from flywheel_runtime.errors import InvalidInputError, NotFoundError
from flywheel_runtime.storage import ObjectStorage

JSONL = "application/x-ndjson"


class S3Images:
    """Images by key in one bucket; the size is checked before the bytes are fetched."""

    def __init__(self, storage: ObjectStorage, bucket: str) -> None:
        self._storage = storage
        self._bucket = bucket

    @property
    def bucket(self) -> str:
        return self._bucket

    async def read(self, key: str, *, max_bytes: int, field: str) -> bytes:
        try:
            size = (await self._storage.stat(self._bucket, key)).size
            if size > max_bytes:
                raise ImageTooLargeError(
                    f"image is {size} bytes, more than the limit of {max_bytes}",
                    field=field,
                    details={"limit_bytes": max_bytes},
                )
            return await self._storage.get(self._bucket, key)
        except NotFoundError as error:
            raise ImageNotFoundError(
                f"no image {key!r} in the data bucket", field=field, details={"key": key}
            ) from error
        except InvalidInputError as error:
            if isinstance(error, ImageTooLargeError):
                raise
            raise ImageSourceRefusedError("not a valid object key", field=field) from error


class S3Results:
    """Results parts ``<prefix>part-NNNNNN.jsonl``, written whole, so a rewrite is harmless."""

    def __init__(self, storage: ObjectStorage) -> None:
        self._storage = storage

    async def write_part(self, bucket: str, prefix: str, index: int, body: bytes) -> None:
        await self._storage.put(bucket, part_key(prefix, index), body, content_type=JSONL)

    async def read_part(self, bucket: str, prefix: str, index: int) -> bytes:
        return await self._storage.get(bucket, part_key(prefix, index))


def part_key(prefix: str, index: int) -> str:
    return f"{prefix}part-{index:06d}.jsonl"


class S3Inputs:
    """Answered inputs, kept where labeling keeps images (``flywheel_contracts.datasets``):
    a labeling request for one of them points at bytes a labeler can fetch."""

    def __init__(self, storage: ObjectStorage, bucket: str, *, remember: int = 100_000) -> None:
        self._storage = storage
        self._bucket = bucket
        self._remember = remember
        self._kept: OrderedDict[str, None] = OrderedDict()
        """Images this replica kept lately: a popular image costs one S3 call, not one each."""

    async def keep(self, sha256: str, data: bytes) -> str:
        key = image_key(sha256)
        if sha256 in self._kept:
            self._kept.move_to_end(sha256)
            return key
        if not await self._storage.exists(self._bucket, key):
            await self._storage.put(self._bucket, key, data)
        self._kept[sha256] = None
        if len(self._kept) > self._remember:
            self._kept.popitem(last=False)
        return key
