"""Starting, watching and stopping the stack's processes.

Each component runs in a session (and process group) of its own, so stopping it reaches the
workers it forked too (uvicorn, MLflow's gunicorn, Triton's Python stubs). The command that
stops a component is usually not the one that started it, so liveness is judged from the pid
and its start time, never from a ``Popen`` object.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from flywheel_cli.state import ComponentState

Probe = Callable[[], bool]
"""Answers whether a component is ready; may raise while it is not."""

POLL_INTERVAL_S = 0.25


class StartError(RuntimeError):
    """A component exited or did not become ready in time; the message carries its log tail."""


class Stopped(StrEnum):
    NOT_RUNNING = "not running"
    TERMINATED = "stopped"
    KILLED = "killed"
    SURVIVED = "still running"


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None when unknown (no ``/proc``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; fields after it are fixed.
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[19])


def start_process(
    name: str,
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    log: Path,
    cwd: Path | None = None,
    port: int | None = None,
    url: str | None = None,
) -> ComponentState:
    """Start ``command`` in a new session with its output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as output:
        process = subprocess.Popen(  # noqa: S603 - commands are built by the CLI, not typed in
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    return ComponentState(
        name=name,
        pid=process.pid,
        start_ticks=process_start_ticks(process.pid),
        command=list(command),
        log=log,
        port=port,
        url=url,
    )


def _reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is our child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _leader_is_ours(component: ComponentState) -> bool:
    """Whether the process now holding the pid is the one that was started."""
    if component.start_ticks is None:
        return True
    ticks = process_start_ticks(component.pid)
    return ticks is None or ticks == component.start_ticks


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] == "Z"


def is_running(component: ComponentState) -> bool:
    """Whether the component's process (its group leader) is alive."""
    _reap(component.pid)
    try:
        os.kill(component.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # the pid now belongs to another user: not ours
    return _leader_is_ours(component) and not _zombie(component.pid)


def group_alive(component: ComponentState) -> bool:
    """Whether any process of the component's group is alive (workers may outlive the leader).

    While a group has members its id cannot be handed to a new process, so signalling the
    group of a leader that has exited is safe.
    """
    _reap(component.pid)
    if is_running(component):
        return True
    if process_start_ticks(component.pid) is not None and not _zombie(component.pid):
        return False  # the pid was recycled by an unrelated process
    try:
        os.killpg(component.pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return not _only_zombies(component.pid)


def _only_zombies(pgid: int) -> bool:
    """True when every process left in group ``pgid`` has exited but was not reaped yet."""
    proc = Path("/proc")
    if not proc.is_dir():
        return False
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return False
    return True


def _signal_group(component: ComponentState, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(component.pid, sig)


def _wait_gone(component: ComponentState, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while group_alive(component):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL_S)
    return True


def stop_process(component: ComponentState, timeout_s: float = 20.0) -> Stopped:
    """SIGTERM the component's process group; SIGKILL what is left after ``timeout_s``."""
    return stop_processes([component], timeout_s)[component.name]


def stop_processes(
    components: Sequence[ComponentState], timeout_s: float = 20.0
) -> dict[str, Stopped]:
    """Stop several components at once: all get SIGTERM, then SIGKILL whoever outlives
    ``timeout_s``, so a slow one does not hold up the others' shutdown."""
    results: dict[str, Stopped] = {}
    alive = []
    for component in components:
        if group_alive(component):
            _signal_group(component, signal.SIGTERM)
            alive.append(component)
        else:
            results[component.name] = Stopped.NOT_RUNNING
    deadline = time.monotonic() + timeout_s
    while alive:
        still = []
        for component in alive:
            if group_alive(component):
                still.append(component)
            else:
                results[component.name] = Stopped.TERMINATED
        alive = still
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(POLL_INTERVAL_S)
    for component in alive:
        _signal_group(component, signal.SIGKILL)
        gone = _wait_gone(component, 5.0)
        results[component.name] = Stopped.KILLED if gone else Stopped.SURVIVED
    return results


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Pending:
    """A started component waiting for its readiness probe."""

    component: ComponentState
    probe: Probe


def wait_ready(
    pending: Sequence[Pending],
    *,
    timeout_s: float,
    on_ready: Callable[[ComponentState, float], None] | None = None,
) -> None:
    """Poll every probe until all answer; fail as soon as one component exits or times out.

    Probes are polled together so components that start in parallel are waited for in
    parallel too.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    waiting = list(pending)
    while waiting:
        for item in list(waiting):
            if _probe(item.probe):
                waiting.remove(item)
                if on_ready is not None:
                    on_ready(item.component, time.monotonic() - started)
            elif not is_running(item.component):
                raise StartError(
                    f"{item.component.name} exited while starting; last lines of "
                    f"{item.component.log}:\n{log_tail(item.component.log)}"
                )
        if not waiting:
            return
        if time.monotonic() >= deadline:
            names = ", ".join(item.component.name for item in waiting)
            logs = "\n".join(
                f"--- {item.component.log}\n{log_tail(item.component.log, 15)}" for item in waiting
            )
            raise StartError(f"{names} not ready within {timeout_s:.0f}s:\n{logs}")
        time.sleep(POLL_INTERVAL_S)


def _probe(probe: Probe) -> bool:
    try:
        return probe()
    except Exception:  # any failure of a probe while starting means "not yet"
        return False
