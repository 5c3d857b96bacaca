"""The one preprocessing function: training, validation and serving all call ``preprocess``.

A model only means what it was trained on. Keeping decode, grayscale, resize and normalisation
in one function (and the tensor names and shape beside it) means a digit photographed by a
labeling tool reaches the model exactly as the training images did, whoever runs it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from flywheel_runtime.errors import InvalidInputError

__all__ = [
    "IMAGE_SIZE",
    "INPUT_NAME",
    "INPUT_SHAPE",
    "MNIST_MEAN",
    "MNIST_STD",
    "OUTPUT_NAME",
    "PREPROCESS_VERSION",
    "RESAMPLE",
    "ImageInput",
    "preprocess",
    "preprocess_batch",
]

INPUT_NAME: Final = "image"
"""Name of the model's input tensor in ONNX, ``config.pbtxt`` and v2 inference requests."""

OUTPUT_NAME: Final = "logits"
"""Name of the model's output tensor (unnormalised class scores, ``[N, num_classes]``)."""

IMAGE_SIZE: Final = 28
"""Side of the square image the model sees."""

INPUT_SHAPE: Final = (1, IMAGE_SIZE, IMAGE_SIZE)
"""Shape of one preprocessed image (channels, height, width); the batch dimension is dynamic."""

MNIST_MEAN: Final = np.float32(0.1307)
MNIST_STD: Final = np.float32(0.3081)
"""Pixel mean and standard deviation of MNIST's training set on the [0, 1] scale."""

RESAMPLE: Final = Image.Resampling.BILINEAR
"""Fixed resize filter: another filter would shift pixel values the model never saw."""

PREPROCESS_VERSION: Final = "1"
"""Bumped whenever the output of ``preprocess`` changes; recorded with every trained model."""

ImageInput = bytes | Image.Image


def preprocess(image: ImageInput) -> npt.NDArray[np.float32]:
    """Encoded image bytes (PNG, JPEG, …) or a Pillow image → ``float32 [1, 28, 28]``.

    Grayscale, resized to 28 x 28 with ``RESAMPLE``, scaled to [0, 1], normalised with the MNIST
    mean and standard deviation. Bytes that are not an image raise ``InvalidInputError``.
    """
    picture = _decode(image) if isinstance(image, bytes | bytearray | memoryview) else image
    gray = picture.convert("L")
    if gray.size != (IMAGE_SIZE, IMAGE_SIZE):
        gray = gray.resize((IMAGE_SIZE, IMAGE_SIZE), RESAMPLE)
    scaled = np.asarray(gray, dtype=np.float32) / np.float32(255.0)
    normalised = (scaled - MNIST_MEAN) / MNIST_STD
    return normalised.reshape(INPUT_SHAPE).astype(np.float32, copy=False)


def preprocess_batch(images: Sequence[ImageInput]) -> npt.NDArray[np.float32]:
    """``preprocess`` over a sequence, stacked into ``float32 [N, 1, 28, 28]``."""
    if not images:
        return np.zeros((0, *INPUT_SHAPE), dtype=np.float32)
    return np.stack([preprocess(image) for image in images])


def _decode(data: bytes | bytearray | memoryview) -> Image.Image:
    try:
        picture = Image.open(io.BytesIO(data))
        # Decode now, inside the try: Pillow is lazy and would fail later, outside it.
        picture.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInputError("the data is not a decodable image") from exc
    return picture
