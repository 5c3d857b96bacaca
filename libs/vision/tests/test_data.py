import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flywheel_vision.data import load_mnist, mnist_dataset, to_png, write_pngs


@pytest.mark.parametrize(("part", "size"), [("train", 50_000), ("validation", 10_000)])
def test_parts_have_their_published_sizes(part: str, size: int) -> None:
    images, labels = load_mnist(part)

    assert images.shape == (size, 28, 28)
    assert images.dtype == np.uint8
    assert labels.shape == (size,)
    assert labels.dtype == np.int64
    assert set(np.unique(labels)) == set(range(10))


def test_a_limit_takes_the_same_first_images_every_time() -> None:
    first, first_labels = load_mnist("test", 10)
    again, again_labels = load_mnist("test", 10)

    assert first.shape == (10, 28, 28)
    assert np.array_equal(first, again)
    assert np.array_equal(first_labels, again_labels)
    assert first.max() > 200  # bytes, not [0, 1) floats


def test_cached_arrays_cannot_be_changed_by_a_caller() -> None:
    images, _ = load_mnist("test", 1)

    with pytest.raises(ValueError, match="read-only"):
        images[0, 0, 0] = 1


def test_png_round_trips_the_pixels() -> None:
    images, _ = load_mnist("test", 1)

    decoded = np.asarray(Image.open(io.BytesIO(to_png(images[0]))))

    assert np.array_equal(decoded, images[0])


def test_write_pngs_names_files_by_index_and_label(tmp_path: Path) -> None:
    _, labels = load_mnist("test", 3)

    paths = write_pngs(tmp_path / "digits", "test", 3)

    assert [p.name for p in paths] == [f"{i}_{labels[i]}.png" for i in range(3)]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)


def test_mnist_dataset_yields_preprocessed_tensors() -> None:
    dataset = mnist_dataset("test", 4)

    image, label = dataset[0]
    assert tuple(image.shape) == (1, 28, 28)
    assert int(label) == int(load_mnist("test", 1)[1][0])
