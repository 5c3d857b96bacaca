import io

import numpy as np
import pytest
from PIL import Image

from flywheel_runtime.errors import InvalidInputError
from flywheel_vision.data import load_mnist, to_png
from flywheel_vision.preprocess import (
    INPUT_SHAPE,
    MNIST_MEAN,
    MNIST_STD,
    image_statistics,
    preprocess,
    preprocess_batch,
)


def _digit() -> np.ndarray:
    images, _ = load_mnist("test", 1)
    return images[0]


def test_preprocess_gives_a_float32_chw_array_of_the_input_shape() -> None:
    result = preprocess(to_png(_digit()))

    assert result.shape == INPUT_SHAPE == (1, 28, 28)
    assert result.dtype == np.float32


def test_preprocess_is_deterministic() -> None:
    png = to_png(_digit())

    assert np.array_equal(preprocess(png), preprocess(png))


def test_png_bytes_and_the_decoded_pil_image_give_the_same_array() -> None:
    png = to_png(_digit())

    from_bytes = preprocess(png)
    from_image = preprocess(Image.open(io.BytesIO(png)))
    from_array = preprocess(Image.fromarray(_digit()))

    assert np.array_equal(from_bytes, from_image)
    assert np.array_equal(from_bytes, from_array)


def test_pixels_are_scaled_to_unit_range_then_normalised_with_mnist_statistics() -> None:
    black = Image.new("L", (28, 28), 0)
    white = Image.new("L", (28, 28), 255)

    assert np.allclose(preprocess(black), -MNIST_MEAN / MNIST_STD)
    assert np.allclose(preprocess(white), (1 - MNIST_MEAN) / MNIST_STD)


def test_colour_images_of_another_size_are_converted_and_resized() -> None:
    photo = Image.new("RGBA", (280, 140), (255, 255, 255, 255))
    buffer = io.BytesIO()
    photo.convert("RGB").save(buffer, format="JPEG")

    result = preprocess(buffer.getvalue())

    assert result.shape == INPUT_SHAPE
    assert np.allclose(result, (1 - MNIST_MEAN) / MNIST_STD, atol=0.05)


def test_bytes_that_are_not_an_image_are_invalid_input() -> None:
    with pytest.raises(InvalidInputError):
        preprocess(b"definitely not a png")


def test_a_batch_stacks_single_results_in_order() -> None:
    images, _ = load_mnist("test", 5)
    pngs = [to_png(image) for image in images]

    batch = preprocess_batch(pngs)

    assert batch.shape == (5, *INPUT_SHAPE)
    for index, png in enumerate(pngs):
        assert np.array_equal(batch[index], preprocess(png))
    assert preprocess_batch([]).shape == (0, *INPUT_SHAPE)


def test_image_statistics_are_grey_level_mean_spread_and_size() -> None:
    white = Image.new("L", (20, 10), color=255)
    halves = Image.new("L", (4, 4), color=0)
    halves.paste(255, (0, 0, 4, 2))
    buffer = io.BytesIO()
    Image.new("RGB", (3, 5), color=(0, 0, 0)).save(buffer, format="PNG")

    assert image_statistics(white) == {
        "brightness": 1.0,
        "contrast": 0.0,
        "width": 20,
        "height": 10,
    }
    assert image_statistics(halves)["brightness"] == pytest.approx(0.5)
    assert image_statistics(halves)["contrast"] == pytest.approx(0.5)
    assert image_statistics(buffer.getvalue()) == {
        "brightness": 0.0,
        "contrast": 0.0,
        "width": 3,
        "height": 5,
    }
