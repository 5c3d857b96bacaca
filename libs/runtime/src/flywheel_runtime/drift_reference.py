"""The drift reference of a model version: what its held-out data looks like to drift checks.

Written once per version by whoever has the model and the data at hand (the validator, when it
scores a candidate on its snapshot's test split) and read by data-monitor, which compares
production windows with it. One ``.npz`` in the data bucket under
``<prefix>/<model line>/<version>.npz``; one row per image in every array:

* ``predicted``: the version's predicted class names (strings);
* ``embeddings``: its penultimate-layer embeddings, float32 ``[n, d]`` (absent when the model
  declares no embedding output);
* ``brightness``, ``contrast``, ``width``, ``height``: the image statistics that
  ``flywheel_contracts.ImageStatistics`` carries per inference (each optional).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_PREFIX",
    "STATISTICS",
    "DriftReference",
    "decode_reference",
    "encode_reference",
    "reference_key",
]

STATISTICS: Final = ("brightness", "contrast", "width", "height")
"""Per-image statistics a reference may hold, as ``ImageStatistics`` names them."""

DEFAULT_PREFIX: Final = "drift/reference"
"""Where references live in the data bucket unless configured otherwise."""


@dataclass(frozen=True)
class DriftReference:
    """The arrays of one reference."""

    predicted: Sequence[str]
    embeddings: npt.NDArray[np.float64] | None = None
    statistics: Mapping[str, npt.NDArray[np.float64]] = field(default_factory=dict)


def reference_key(prefix: str, model_line: str, version: str) -> str:
    """Key of a version's reference in the data bucket."""
    return f"{prefix.rstrip('/')}/{model_line}/{version}.npz"


def encode_reference(reference: DriftReference) -> bytes:
    """The ``.npz`` bytes of ``reference``."""
    arrays: dict[str, np.ndarray[Any, Any]] = {
        "predicted": np.asarray(list(reference.predicted), dtype=str)
    }
    if reference.embeddings is not None:
        arrays["embeddings"] = np.asarray(reference.embeddings, dtype=np.float32)
    for name, values in reference.statistics.items():
        if name not in STATISTICS:
            raise ValueError(f"unknown statistic {name!r}; expected one of {STATISTICS}")
        arrays[name] = np.asarray(values, dtype=np.float64)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def decode_reference(data: bytes) -> DriftReference:
    """A reference from its ``.npz`` bytes (no pickles are loaded)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return DriftReference(
            predicted=[str(value) for value in arrays["predicted"]],
            embeddings=(
                arrays["embeddings"].astype(np.float64) if "embeddings" in arrays else None
            ),
            statistics={
                name: arrays[name].astype(np.float64) for name in STATISTICS if name in arrays
            },
        )
