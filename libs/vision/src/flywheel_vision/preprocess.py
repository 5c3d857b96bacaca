"""The one preprocessing function: training, validation and serving all call ``preprocess``.

A model only means what it was trained on. Keeping decode, colour mode, resize and
normalisation in one function (and the tensor names beside it) means an image sent by a
labeling tool reaches the model exactly as the training images did, whoever runs it.

What the function does is data, not code: a ``PreprocessSpec`` (input size, channels, mean and
standard deviation, resize filter) travels with each model version in its ``model.json``, so
serving and validation preprocess every version the way it declared. ``MNIST_PREPROCESS`` is
the reference model's spec and the one assumed for versions that declare none.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Final, Literal, Self

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flywheel_runtime.errors import InvalidInputError

__all__ = [
    "EMBEDDING_NAME",
    "IMAGE_SIZE",
    "INPUT_NAME",
    "INPUT_SHAPE",
    "MNIST_MEAN",
    "MNIST_PREPROCESS",
    "MNIST_STD",
    "OUTPUT_NAME",
    "PREPROCESS_VERSION",
    "RESAMPLE",
    "ImageInput",
    "PreprocessSpec",
    "Resize",
    "image_statistics",
    "preprocess",
    "preprocess_batch",
]

INPUT_NAME: Final = "image"
"""Name of the model's input tensor in ONNX, ``config.pbtxt`` and v2 inference requests."""

OUTPUT_NAME: Final = "logits"
"""Name of the model's output tensor (unnormalised class scores, ``[N, num_classes]``)."""

EMBEDDING_NAME: Final = "embedding"
"""Name of a model's optional second output: its penultimate layer, ``[N, D]``, which drift
checks compare with the training data's."""

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

Resize = Literal["nearest", "bilinear", "bicubic"]
"""Resize filters a spec may name (Pillow's, by their usual names)."""

_FILTERS: Final = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
_MODES: Final = {1: "L", 3: "RGB"}


class PreprocessSpec(BaseModel):
    """How an encoded image becomes a model's input: declared by the model, versioned with it.

    Decoded, converted to grayscale (1 channel) or RGB (3), resized to ``height`` x ``width``
    with ``resize`` (left alone when already that size), scaled to [0, 1], then normalised per
    channel: ``(pixel - mean) / std``. The result is ``float32 [channels, height, width]``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    height: int = Field(ge=1, le=4096)
    """Rows of the model's input."""
    width: int = Field(ge=1, le=4096)
    """Columns of the model's input."""
    channels: Literal[1, 3] = 1
    """1: grayscale; 3: RGB."""
    mean: tuple[float, ...] = (0.0,)
    """Per-channel mean on the [0, 1] scale, subtracted after scaling."""
    std: tuple[float, ...] = (1.0,)
    """Per-channel standard deviation on the [0, 1] scale, divided by after the mean."""
    resize: Resize = "bilinear"
    """Filter used when the image is not already ``height`` x ``width``."""

    @model_validator(mode="after")
    def _one_statistic_per_channel(self) -> Self:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need one value per channel ({self.channels})")
        if not all(s > 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one preprocessed image: (channels, height, width)."""
        return (self.channels, self.height, self.width)


MNIST_PREPROCESS: Final = PreprocessSpec(
    height=IMAGE_SIZE,
    width=IMAGE_SIZE,
    channels=1,
    mean=(float(MNIST_MEAN),),
    std=(float(MNIST_STD),),
    resize="bilinear",
)
"""The reference model's preprocessing, and the one of versions that declare none."""


def preprocess(
    image: ImageInput, spec: PreprocessSpec = MNIST_PREPROCESS
) -> npt.NDArray[np.float32]:
    """Encoded image bytes (PNG, JPEG, …) or a Pillow image → ``float32 [C, H, W]``.

    As ``spec`` says (by default MNIST's: grayscale, 28 x 28 bilinear, MNIST mean and standard
    deviation). Bytes that are not an image raise ``InvalidInputError``.
    """
    picture = _decode(image) if isinstance(image, bytes | bytearray | memoryview) else image
    converted = picture.convert(_MODES[spec.channels])
    if converted.size != (spec.width, spec.height):
        converted = converted.resize((spec.width, spec.height), _FILTERS[spec.resize])
    scaled = np.asarray(converted, dtype=np.float32) / np.float32(255.0)
    if spec.channels == 1:
        # The single-channel path keeps scalar statistics: the reference's exact arithmetic.
        normalised = (scaled - np.float32(spec.mean[0])) / np.float32(spec.std[0])
        return normalised.reshape(spec.input_shape).astype(np.float32, copy=False)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    normalised = (scaled - mean) / std
    return np.ascontiguousarray(normalised.transpose(2, 0, 1), dtype=np.float32)


def preprocess_batch(
    images: Sequence[ImageInput], spec: PreprocessSpec = MNIST_PREPROCESS
) -> npt.NDArray[np.float32]:
    """``preprocess`` over a sequence, stacked into ``float32 [N, C, H, W]``."""
    if not images:
        return np.zeros((0, *spec.input_shape), dtype=np.float32)
    return np.stack([preprocess(image, spec) for image in images])


def _decode(data: bytes | bytearray | memoryview) -> Image.Image:
    try:
        picture = Image.open(io.BytesIO(data))
        # Decode now, inside the try: Pillow is lazy and would fail later, outside it.
        picture.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInputError("the data is not a decodable image") from exc
    return picture


def image_statistics(image: ImageInput) -> dict[str, float | int]:
    """Cheap statistics of an image as it arrived, before preprocessing: mean and standard
    deviation of its grey levels on [0, 1], and its size (``flywheel_contracts.ImageStatistics``).

    Drift checks compare them with the training images': inverted, washed-out or resized
    inputs show here whatever the model makes of them.
    """
    picture = _decode(image) if isinstance(image, bytes | bytearray | memoryview) else image
    grey = np.asarray(picture.convert("L"), dtype=np.float32) / np.float32(255.0)
    return {
        "brightness": round(float(grey.mean()), 6),
        "contrast": round(float(grey.std()), 6),
        "width": picture.width,
        "height": picture.height,
    }
