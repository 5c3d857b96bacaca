"""From logits to answers: softmax over each row, then the k most likely classes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class ClassScore:
    class_name: str
    score: float
    """Softmax probability, in [0, 1]."""


def softmax(logits: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
    """Row-wise softmax of ``[N, C]`` logits, computed in float64 and shifted by the row max so
    large logits cannot overflow."""
    values = np.asarray(logits, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"logits must be [N, C], not shape {values.shape}")
    shifted = values - values.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probabilities: npt.NDArray[np.float64] = exp / exp.sum(axis=1, keepdims=True)
    return probabilities


def top_k(probabilities: Sequence[float], labels: Sequence[str], k: int) -> list[ClassScore]:
    """The ``k`` most likely classes, best first; ties keep label order, so answers are stable."""
    if len(probabilities) != len(labels):
        raise ValueError(f"{len(probabilities)} scores for {len(labels)} classes")
    # A stable sort on the negated scores: equal scores stay in class order.
    order = np.argsort(-np.asarray(probabilities, dtype=np.float64), kind="stable")
    return [
        ClassScore(labels[index], float(probabilities[index]))
        for index in order[: max(0, min(k, len(labels)))]
    ]
