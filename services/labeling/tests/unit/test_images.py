import hashlib
import io
import struct
import zlib

import pytest
from PIL import Image

from flywheel_labeling.errors import ImageTooLargeError, InvalidImageError
from flywheel_labeling.images import check_image, decode_base64

from ..conftest import digit_image

LIMITS = {"max_bytes": 1_000_000, "max_pixels": 1_000_000, "field": "image"}


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header announces ``width`` x ``height`` but whose data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def test_a_png_is_accepted_with_its_hash_and_type() -> None:
    data = digit_image(1)

    checked = check_image(data, **LIMITS)

    assert checked.sha256 == hashlib.sha256(data).hexdigest()
    assert (checked.format, checked.content_type) == ("PNG", "image/png")
    assert (checked.width, checked.height) == (28, 28)


def test_a_jpeg_is_accepted() -> None:
    checked = check_image(digit_image(2, fmt="JPEG"), **LIMITS)

    assert checked.content_type == "image/jpeg"


@pytest.mark.parametrize("data", [b"hello, not an image", b"%PDF-1.7\n..."])
def test_bytes_that_are_no_image_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidImageError, match="not an image") as raised:
        check_image(data, **LIMITS)

    assert raised.value.details["field"] == "image"
    assert raised.value.http_status == 422


def test_an_empty_upload_is_refused() -> None:
    with pytest.raises(InvalidImageError, match="empty"):
        check_image(b"", **LIMITS)


def test_a_truncated_png_is_refused() -> None:
    data = digit_image(3, size=(200, 200))

    with pytest.raises(InvalidImageError, match="truncated"):
        check_image(data[: len(data) * 2 // 3], **LIMITS)


def test_a_truncated_jpeg_is_refused() -> None:
    data = digit_image(4, size=(200, 200), fmt="JPEG")

    with pytest.raises(InvalidImageError, match="truncated"):
        check_image(data[: len(data) // 2], **LIMITS)


def test_more_bytes_than_the_limit_is_413() -> None:
    with pytest.raises(ImageTooLargeError) as raised:
        check_image(digit_image(5), max_bytes=100, max_pixels=10**6, field="items.2.image_base64")

    assert raised.value.http_status == 413
    assert raised.value.details == {"limit_bytes": 100, "field": "items.2.image_base64"}


def test_more_pixels_than_the_limit_is_refused_from_the_header() -> None:
    with pytest.raises(ImageTooLargeError, match="8000x8000") as raised:
        check_image(_png_header_only(8000, 8000), max_bytes=10**6, max_pixels=40_000_000, field="f")

    assert raised.value.http_status == 413


def test_a_decompression_bomb_is_refused_before_decoding() -> None:
    with pytest.raises(ImageTooLargeError):
        check_image(_png_header_only(50_000, 50_000), **LIMITS)


def test_a_format_we_do_not_decode_is_refused() -> None:
    out = io.BytesIO()
    Image.new("RGB", (16, 16)).save(out, "ICO")

    with pytest.raises(InvalidImageError, match="supported format"):
        check_image(out.getvalue(), **LIMITS)


def test_base64_is_strict() -> None:
    assert decode_base64("aGVsbG8=") == b"hello"
    with pytest.raises(ValueError, match="not valid base64"):
        decode_base64("aGVsbG8")
    with pytest.raises(ValueError, match="not valid base64"):
        decode_base64("not base64!")
