"""How a run's end is read: pure decisions on exit statuses and on runs found after a restart.

``retryable`` on training.failed says whether the same run may succeed if started again: a
process killed from outside (out-of-memory killer, preemption, a lost machine) may; one that
exited with an error, ran out of time or was cancelled will not without a change.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from enum import StrEnum

from flywheel_trainer_dispatch.ports import Phase, RunState

LOST_WHILE_DOWN = "lost while trainer-dispatch was down"


@dataclass(frozen=True)
class Failure:
    reason: str
    retryable: bool


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _is_signal(number: int) -> bool:
    try:
        signal.Signals(number)
    except ValueError:
        return False
    return True


def exit_failure(exit_code: int | None) -> Failure:
    """Why a run whose processes ended without a result failed."""
    if exit_code is None:
        return Failure("training ended without a result (exit status unknown)", retryable=True)
    if exit_code < 0:
        return Failure(f"training was killed by {signal_name(-exit_code)}", retryable=True)
    if exit_code > 128 and _is_signal(exit_code - 128):
        # A launcher reporting a child killed by a signal (137 = 128 + SIGKILL).
        return Failure(
            f"training exited with code {exit_code} ({signal_name(exit_code - 128)})",
            retryable=True,
        )
    if exit_code == 0:
        return Failure("training exited with code 0 but wrote no result", retryable=False)
    return Failure(f"training exited with code {exit_code}", retryable=False)


def timeout_failure(timeout_s: float) -> Failure:
    return Failure(f"timed out after {timeout_s:g}s; its processes were killed", retryable=False)


CANCELLED = Failure("cancelled by an operator", retryable=False)
CANCELLED_WHILE_QUEUED = Failure("cancelled by an operator before it started", retryable=False)


def lost_failure(exit_code: int | None) -> Failure:
    """A run that ended while nobody watched it and left no result."""
    if exit_code is None:
        return Failure(LOST_WHILE_DOWN, retryable=True)
    ended = exit_failure(exit_code)
    return Failure(f"{LOST_WHILE_DOWN}; {ended.reason}", retryable=ended.retryable)


def silent_owner_failure(owner: str | None, silent_s: float) -> Failure:
    return Failure(
        f"lost: its trainer-dispatch instance {owner!r} has not reported for {silent_s:.0f}s",
        retryable=True,
    )


class Recovery(StrEnum):
    """What to do with a run in progress found at startup."""

    REATTACH = "reattach"
    """It still runs and is ours: watch it again."""
    SUCCEED = "succeed"
    """It finished while we were down and left its result: announce it."""
    LOST = "lost"
    """It ended while we were down and left no result (its exit status may be known)."""
    REQUEUE = "requeue"
    """It was chosen to start but never launched: put it back in the queue."""


def recovery_for(state: RunState, phase: Phase) -> Recovery:
    """The decision for a run left ``state`` (starting or running) whose backend says ``phase``."""
    if not state.active:
        raise ValueError(f"only runs in progress are recovered, not {state}")
    if phase is Phase.RUNNING:
        return Recovery.REATTACH
    if phase is Phase.SUCCEEDED:
        return Recovery.SUCCEED
    if phase is Phase.NOT_STARTED and state is RunState.STARTING:
        return Recovery.REQUEUE
    # FAILED, LOST, and NOT_STARTED for a run that did start (its trace vanished).
    return Recovery.LOST
