import io
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

ImageFactory = Callable[..., bytes]


def digit_image(seed: int, size: tuple[int, int] = (28, 28), fmt: str = "PNG") -> bytes:
    """A distinct MNIST-sized grayscale image per seed."""
    pixels = (np.random.default_rng(seed).random((size[1], size[0])) * 255).astype("uint8")
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, fmt)
    return out.getvalue()


@pytest.fixture(scope="session")
def image() -> ImageFactory:
    return digit_image
