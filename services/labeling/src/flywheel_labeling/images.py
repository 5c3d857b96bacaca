"""Checking that uploaded bytes are an image we can train on, before anything is stored.

The pixel count is read from the header and refused before any decoding, so a decompression
bomb never gets decoded. ``verify()`` catches structural damage and a full ``load()`` catches
truncation (``verify`` alone passes a PNG cut short inside its pixel data).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from flywheel_labeling.errors import ImageTooLargeError, InvalidImageError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
"""Formats we decode; anything else is refused rather than handed to a rarely used decoder."""

OCTET_STREAM = "application/octet-stream"


@dataclass(frozen=True)
class CheckedImage:
    """Bytes known to be a complete image within the limits."""

    data: bytes
    sha256: str
    format: str
    content_type: str
    width: int
    height: int


def check_image(data: bytes, *, max_bytes: int, max_pixels: int, field: str) -> CheckedImage:
    """The image in ``data``, or an error naming ``field`` (413 for size, 422 otherwise)."""
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
            with Image.open(io.BytesIO(data), formats=FORMATS) as header:
                width, height = header.size
                image_format = header.format or ""
                content_type = header.get_format_mimetype() or "application/octet-stream"
                _check_pixels(width, height, max_pixels, field)
                header.verify()
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                image.load()
        except UnidentifiedImageError as error:
            raise InvalidImageError(
                f"not an image in a supported format ({', '.join(FORMATS)})", field=field
            ) from error
        except Image.DecompressionBombError as error:
            raise ImageTooLargeError(
                "image has too many pixels", field=field, details={"limit_pixels": max_pixels}
            ) from error
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise InvalidImageError("image is truncated or corrupt", field=field) from error
    return CheckedImage(
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        format=image_format,
        content_type=content_type,
        width=width,
        height=height,
    )


def _check_pixels(width: int, height: int, max_pixels: int, field: str) -> None:
    if width <= 0 or height <= 0:
        raise InvalidImageError("image has no pixels", field=field)
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels, more than the limit of "
            f"{max_pixels}",
            field=field,
            details={"limit_pixels": max_pixels},
        )


def media_type(data: bytes) -> str:
    """The image media type of ``data``, read from its header (nothing is decoded);
    ``application/octet-stream`` for bytes that are no image we know."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=FORMATS) as header:
                return header.get_format_mimetype() or OCTET_STREAM
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError):
            return OCTET_STREAM


def decode_base64(value: str) -> bytes:
    """Strict base64 (standard alphabet, padding required); ``ValueError`` names the problem."""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"not valid base64: {error}") from error
