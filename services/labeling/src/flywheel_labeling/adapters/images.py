"""``ImageStore`` on S3: images in the data bucket under their content address."""

from __future__ import annotations

from flywheel_contracts.datasets import image_key
from flywheel_labeling.images import CheckedImage
from flywheel_runtime.errors import NotFoundError
from flywheel_runtime.storage import ObjectStorage


class S3ImageStore:
    """Images stored once per content: the key is ``image_key(sha256)``."""

    def __init__(self, storage: ObjectStorage, bucket: str) -> None:
        self._storage = storage
        self._bucket = bucket

    @property
    def bucket(self) -> str:
        return self._bucket

    async def put(self, image: CheckedImage) -> str:
        key = image_key(image.sha256)
        # One PUT, no existence check first: the same bytes land on the same key, so a repeat
        # upload changes nothing and costs one request instead of two.
        await self._storage.put(self._bucket, key, image.data, content_type=image.content_type)
        return key

    async def size(self, key: str) -> int | None:
        try:
            return (await self._storage.stat(self._bucket, key)).size
        except NotFoundError:
            return None

    async def read(self, key: str) -> bytes:
        return await self._storage.get(self._bucket, key)
