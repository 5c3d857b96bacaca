import os
from pathlib import Path

import pytest

from flywheel_trainer_dispatch.adapters.local import process_info, run_processes, runs_process
from flywheel_trainer_dispatch.outcomes import (
    LOST_WHILE_DOWN,
    Recovery,
    exit_failure,
    lost_failure,
    recovery_for,
    timeout_failure,
)
from flywheel_trainer_dispatch.ports import Phase, RunState

RUN_ID = "4b0f6c2e-9a51-5d7c-8e3b-1f2a3c4d5e6f"


@pytest.mark.parametrize(
    ("state", "phase", "action"),
    [
        (RunState.RUNNING, Phase.RUNNING, Recovery.REATTACH),
        (RunState.STARTING, Phase.RUNNING, Recovery.REATTACH),
        (RunState.RUNNING, Phase.SUCCEEDED, Recovery.SUCCEED),
        (RunState.STARTING, Phase.SUCCEEDED, Recovery.SUCCEED),
        (RunState.RUNNING, Phase.FAILED, Recovery.LOST),
        (RunState.RUNNING, Phase.LOST, Recovery.LOST),
        (RunState.STARTING, Phase.LOST, Recovery.LOST),
        (RunState.STARTING, Phase.NOT_STARTED, Recovery.REQUEUE),
        (RunState.RUNNING, Phase.NOT_STARTED, Recovery.LOST),
    ],
)
def test_recovery_decisions(state: RunState, phase: Phase, action: Recovery) -> None:
    assert recovery_for(state, phase) is action


def test_only_runs_in_progress_are_recovered() -> None:
    with pytest.raises(ValueError, match="in progress"):
        recovery_for(RunState.QUEUED, Phase.RUNNING)


def test_a_run_gone_without_a_trace_is_lost_while_down_and_retryable() -> None:
    lost = lost_failure(None)

    assert lost.reason == LOST_WHILE_DOWN
    assert lost.retryable


def test_a_run_reaped_after_a_restart_says_how_it_ended() -> None:
    killed = lost_failure(-9)
    crashed = lost_failure(1)

    assert killed.reason == f"{LOST_WHILE_DOWN}; training was killed by SIGKILL"
    assert killed.retryable
    assert crashed.reason == f"{LOST_WHILE_DOWN}; training exited with code 1"
    assert not crashed.retryable


@pytest.mark.parametrize(
    ("exit_code", "reason", "retryable"),
    [
        (-9, "training was killed by SIGKILL", True),
        (-15, "training was killed by SIGTERM", True),
        (137, "training exited with code 137 (SIGKILL)", True),
        (1, "training exited with code 1", False),
        (0, "training exited with code 0 but wrote no result", False),
        (None, "training ended without a result (exit status unknown)", True),
    ],
)
def test_exit_statuses_become_reasons(exit_code: int | None, reason: str, retryable: bool) -> None:
    failure = exit_failure(exit_code)

    assert (failure.reason, failure.retryable) == (reason, retryable)


def test_a_timeout_is_not_retryable() -> None:
    failure = timeout_failure(2.5)

    assert failure.reason == "timed out after 2.5s; its processes were killed"
    assert not failure.retryable


def _fake_process(
    proc: Path, pid: int, *, pgid: int, state: str = "S", cmdline: list[str] | None = None
) -> None:
    folder = proc / str(pid)
    folder.mkdir(parents=True)
    (folder / "stat").write_text(f"{pid} (python3 (x)) {state} 1 {pgid} {pgid} 0 -1\n")
    raw = "\0".join(cmdline or []) + ("\0" if cmdline else "")
    (folder / "cmdline").write_bytes(raw.encode())


def test_a_process_is_ours_only_when_its_command_line_carries_the_run_id(tmp_path: Path) -> None:
    ours = ["python3", "-m", "flywheel_vision.train", "--training-run-id", RUN_ID]
    _fake_process(tmp_path, 100, pgid=100, cmdline=ours)
    _fake_process(tmp_path, 101, pgid=100, cmdline=ours)
    _fake_process(tmp_path, 200, pgid=200, cmdline=["python3", "-m", "http.server"])
    _fake_process(tmp_path, 300, pgid=300, state="Z")
    _fake_process(tmp_path, 301, pgid=301, cmdline=["grep", f"x{RUN_ID}"])

    leader = process_info(100, tmp_path)

    assert leader is not None
    assert leader.pgid == 100
    assert runs_process(leader, RUN_ID)
    assert not runs_process(process_info(200, tmp_path), RUN_ID)
    assert process_info(300, tmp_path) is None  # a zombie is not running
    assert process_info(999, tmp_path) is None  # gone
    assert not runs_process(process_info(301, tmp_path), RUN_ID)
    assert sorted(p.pid for p in run_processes(RUN_ID, tmp_path)) == [100, 101]


def test_process_info_reads_this_machines_proc() -> None:
    info = process_info(os.getpid())

    assert info is not None
    assert info.pgid == os.getpgid(os.getpid())
    assert info.cmdline
