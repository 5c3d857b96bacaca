"""Where an image comes from, read the same way by every front (HTTP, batch, Label Studio).

An image arrives as bytes (a multipart file, base64, a ``data:`` URI) or as a reference to an
object in the data bucket (``s3_key``, ``s3://<data bucket>/<key>``). Anything else (another
bucket, http URLs, Label Studio's local upload paths) is refused naming the field: the BFF never
fetches from wherever a request points. Size and pixel limits are checked before decoding, so a
decompression bomb is never decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from PIL import Image, UnidentifiedImageError

from flywheel_inference_bff.errors import (
    ImageSourceRefusedError,
    ImageTooLargeError,
    InvalidImageError,
)

S3_SCHEME = "s3://"
DATA_SCHEME = "data:"
MAX_KEY_LENGTH = 1024


@dataclass(frozen=True)
class ImageBytes:
    """An image sent in the request itself."""

    data: bytes
    field: str


@dataclass(frozen=True)
class StoredImage:
    """An image already in the data bucket."""

    key: str
    field: str


ImageRef = ImageBytes | StoredImage


def decode_base64(value: str, field: str) -> bytes:
    """Strict base64 (standard alphabet, padding required) or a refusal naming ``field``."""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidImageError(f"not valid base64: {error}", field=field) from error


def stored_key(value: str, bucket: str, field: str) -> str:
    """The object key of ``s3://<bucket>/<key>`` or of a bare key, in the data bucket only."""
    key = value
    if value.startswith(S3_SCHEME):
        named_bucket, _, key = value.removeprefix(S3_SCHEME).partition("/")
        if named_bucket != bucket:
            raise ImageSourceRefusedError(
                f"images are read from the data bucket {bucket!r} only, not {named_bucket!r}",
                field=field,
            )
    elif "://" in value:
        raise ImageSourceRefusedError(
            "give an object key or s3://<data bucket>/<key>; other URLs are not fetched",
            field=field,
        )
    if not key or key.startswith("/") or "\x00" in key or len(key) > MAX_KEY_LENGTH:
        raise ImageSourceRefusedError("not a valid object key", field=field)
    return key


def data_uri_bytes(uri: str, field: str) -> bytes:
    """The bytes of a ``data:[<type>][;base64],<data>`` URI (RFC 2397)."""
    header, comma, payload = uri.removeprefix(DATA_SCHEME).partition(",")
    if not comma:
        raise InvalidImageError("data URI has no ',' before its data", field=field)
    if header.split(";")[-1].strip().lower() == "base64":
        return decode_base64(unquote_to_bytes(payload).decode("ascii", errors="replace"), field)
    return unquote_to_bytes(payload)


def task_image(value: object, bucket: str, field: str) -> ImageRef:
    """A Label Studio task's image: ``s3://<data bucket>/<key>`` or a ``data:`` URI."""
    if not isinstance(value, str) or not value:
        raise ImageSourceRefusedError("the task has no image reference", field=field)
    if value.startswith(S3_SCHEME):
        return StoredImage(stored_key(value, bucket, field), field)
    if value.startswith(DATA_SCHEME):
        return ImageBytes(data_uri_bytes(value, field), field)
    raise ImageSourceRefusedError(
        "the task image must be s3://<data bucket>/<key> or a data: URI; "
        "the BFF does not fetch other sources",
        field=field,
    )


def check_image(data: bytes, *, max_bytes: int, max_pixels: int, field: str) -> None:
    """Refuse an image over the byte or pixel limit (413) or without a readable header (422)."""
    if len(data) > max_bytes:
        raise ImageTooLargeError(
            f"image is {len(data)} bytes, more than the limit of {max_bytes}",
            field=field,
            details={"limit_bytes": max_bytes},
        )
    if not data:
        raise InvalidImageError("image is empty", field=field)
    with warnings.catch_warnings():
        # Pillow warns (and past twice its own limit raises) on huge images; ours is stricter.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
            raise InvalidImageError("not a decodable image", field=field) from exc
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} pixels, more than the limit of {max_pixels}",
            field=field,
            details={"limit_pixels": max_pixels},
        )
