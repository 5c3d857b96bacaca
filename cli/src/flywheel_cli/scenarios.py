"""What ``flywheel demo`` can be asked to do; kept apart from the demo itself, whose imports
(PyTorch through the vision library) would slow every other command down."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

SCENARIOS: Final = ("normal", "poisoned")
"""``normal``: labelers correct pre-fills and a better model should win its canary.
``poisoned``: a batch of shuffled labels that the loop should refuse."""


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why."""


@dataclass(frozen=True)
class DemoOptions:
    scenario: str = "normal"
    keep: bool = False
    """Leave a stack the demo started running afterwards."""
    free_ports: bool = False
    """Start the stack on free ports when the demo has to start it."""
