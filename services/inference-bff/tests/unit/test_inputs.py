import base64

import pytest

from flywheel_inference_bff.errors import (
    ImageSourceRefusedError,
    ImageTooLargeError,
    InvalidImageError,
)
from flywheel_inference_bff.inputs import (
    ImageBytes,
    StoredImage,
    check_image,
    data_uri_bytes,
    decode_base64,
    stored_key,
    task_image,
)

from ..conftest import digit_image

BUCKET = "flywheel-data"
KEY = "images/ab/" + "ab" * 32


def test_base64_is_strict_and_names_the_field() -> None:
    png = digit_image(1)

    assert decode_base64(base64.b64encode(png).decode(), "image_b64") == png
    with pytest.raises(InvalidImageError) as bad:
        decode_base64("not base64!", "images.2.image_b64")
    assert bad.value.field == "images.2.image_b64"
    assert bad.value.http_status == 422


@pytest.mark.parametrize("value", [KEY, f"s3://{BUCKET}/{KEY}"])
def test_keys_are_bare_or_s3_uris_in_the_data_bucket(value: str) -> None:
    assert stored_key(value, BUCKET, "s3_key") == KEY


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (f"s3://other-bucket/{KEY}", "data bucket"),
        ("https://example.com/a.png", "not fetched"),
        ("file:///etc/passwd", "not fetched"),
        (f"s3://{BUCKET}/", "not a valid object key"),
        ("/absolute/key", "not a valid object key"),
        ("", "not a valid object key"),
    ],
)
def test_other_image_sources_are_refused_naming_the_field(value: str, reason: str) -> None:
    with pytest.raises(ImageSourceRefusedError, match=reason) as refused:
        stored_key(value, BUCKET, "s3_key")

    assert refused.value.field == "s3_key"
    assert refused.value.http_status == 422


def test_data_uris_carry_base64_or_percent_encoded_bytes() -> None:
    png = digit_image(2)
    encoded = base64.b64encode(png).decode()

    assert data_uri_bytes(f"data:image/png;base64,{encoded}", "f") == png
    assert data_uri_bytes("data:text/plain,%00%01abc", "f") == b"\x00\x01abc"
    with pytest.raises(InvalidImageError, match="','"):
        data_uri_bytes("data:image/png;base64", "f")
    with pytest.raises(InvalidImageError, match="base64"):
        data_uri_bytes("data:image/png;base64,@@@", "f")


def test_a_label_studio_task_image_is_an_s3_key_or_a_data_uri() -> None:
    png = digit_image(3)
    field = "tasks.0.data.image"

    stored = task_image(f"s3://{BUCKET}/{KEY}", BUCKET, field)
    inline = task_image("data:image/png;base64," + base64.b64encode(png).decode(), BUCKET, field)

    assert stored == StoredImage(KEY, field)
    assert inline == ImageBytes(png, field)
    for refused in ("http://ls:8080/data/upload/1/a.png", "/data/upload/1/a.png", None, 7):
        with pytest.raises(ImageSourceRefusedError) as error:
            task_image(refused, BUCKET, field)
        assert error.value.field == field


def test_images_over_the_byte_or_pixel_limit_are_413_and_garbage_is_422() -> None:
    small = digit_image(4)
    big = digit_image(5, size=(600, 600))

    check_image(small, max_bytes=10_000, max_pixels=1_000, field="image")
    with pytest.raises(ImageTooLargeError) as too_many_bytes:
        check_image(small, max_bytes=10, max_pixels=1_000, field="image")
    with pytest.raises(ImageTooLargeError) as too_many_pixels:
        check_image(big, max_bytes=10_000_000, max_pixels=500 * 500, field="image")
    with pytest.raises(InvalidImageError):
        check_image(b"definitely not an image", max_bytes=1000, max_pixels=1000, field="image")
    with pytest.raises(InvalidImageError, match="empty"):
        check_image(b"", max_bytes=1000, max_pixels=1000, field="image")

    assert too_many_bytes.value.http_status == 413
    assert too_many_pixels.value.details["limit_pixels"] == 250_000
