"""The digit classifier: a compact CNN sized for CPUs, so the whole loop runs on a laptop.

Two conv blocks and a small dense head train on a few thousand images in seconds on two CPU
cores and export to a few hundred kilobytes of ONNX. The classification layer is its own
module (``head``) so a model retrained on a different set of classes can keep the features
of its predecessor and start only the head from scratch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import torch
from torch import nn

__all__ = ["EMBEDDING_SIZE", "HEAD_PREFIX", "DigitNet", "load_compatible"]

HEAD_PREFIX: Final = "head."
"""State-dict prefix of the classification layer, the only part tied to the class list."""

EMBEDDING_SIZE: Final = 64
"""Width of the penultimate activations (``features``' output), exported as the embedding."""


class DigitNet(nn.Module):
    """``[N, 1, 28, 28]`` normalised images → ``[N, num_classes]`` logits.

    ``forward_with_embedding`` also gives the ``[N, 64]`` features the head reads: the
    embedding the ONNX export carries beside the logits for drift checks.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, EMBEDDING_SIZE),
            nn.ReLU(),
        )
        self.head = nn.Linear(EMBEDDING_SIZE, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # The argument is named like the ONNX input, so export can address it by name.
        logits: torch.Tensor = self.head(self.features(image))
        return logits

    def forward_with_embedding(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the embedding they were computed from, in one pass."""
        embedding: torch.Tensor = self.features(image)
        logits: torch.Tensor = self.head(embedding)
        return logits, embedding


def load_compatible(
    model: nn.Module, state: Mapping[str, torch.Tensor], *, with_head: bool
) -> None:
    """Load a base model's ``state`` into ``model``, all of it or all but the head.

    ``with_head=False`` is for a base trained on other classes: its features are kept and the
    head keeps its fresh initialisation. Any other mismatch is an error, never a silent skip.
    """
    wanted = {
        key: value for key, value in state.items() if with_head or not key.startswith(HEAD_PREFIX)
    }
    missing, unexpected = model.load_state_dict(wanted, strict=False)
    missing = [key for key in missing if with_head or not key.startswith(HEAD_PREFIX)]
    if missing or unexpected:
        raise ValueError(
            f"state does not fit the model: missing {missing}, unexpected {unexpected}"
        )
