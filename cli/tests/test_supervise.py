import os
import sys
from pathlib import Path

import pytest

from flywheel_cli.stack import free_ports, http_probe
from flywheel_cli.state import ComponentState
from flywheel_cli.supervise import (
    Pending,
    StartError,
    Stopped,
    group_alive,
    is_running,
    start_process,
    stop_process,
    stop_processes,
    wait_ready,
)
from flywheel_testing.wait import wait_until

PAUSE = "import signal; signal.pause()"


def python(name: str, script: str, tmp_path: Path) -> ComponentState:
    return start_process(
        name, [sys.executable, "-c", script], env=os.environ, log=tmp_path / f"{name}.log"
    )


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2 :].split()[0] == "Z"


def test_a_started_process_runs_until_it_is_stopped(tmp_path: Path) -> None:
    component = python("sleeper", PAUSE, tmp_path)
    assert is_running(component)

    assert stop_process(component, timeout_s=30) is Stopped.TERMINATED

    assert not is_running(component)
    assert not group_alive(component)
    assert stop_process(component) is Stopped.NOT_RUNNING


def test_a_process_that_ignores_sigterm_is_killed_after_the_timeout(tmp_path: Path) -> None:
    script = (
        "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); signal.pause()"
    )
    component = python("stubborn", script, tmp_path)
    wait_until(lambda: "ready" in component.log.read_text(), timeout=60, message="handler set")

    assert stop_process(component, timeout_s=0.5) is Stopped.KILLED
    assert not is_running(component)


def test_stopping_reaches_the_workers_a_component_forked(tmp_path: Path) -> None:
    script = (
        "import subprocess, sys, signal; "
        f"child = subprocess.Popen([sys.executable, '-c', {PAUSE!r}]); "
        "print(child.pid, flush=True); signal.pause()"
    )
    component = python("parent", script, tmp_path)
    child = int(
        wait_until(lambda: component.log.read_text().strip(), timeout=60, message="child pid")
    )

    assert stop_process(component, timeout_s=30) is Stopped.TERMINATED
    assert gone(child)


def test_several_components_stop_together(tmp_path: Path) -> None:
    components = [python(f"p{n}", PAUSE, tmp_path) for n in range(3)]

    results = stop_processes(components, timeout_s=30)

    assert results == {f"p{n}": Stopped.TERMINATED for n in range(3)}


def test_a_recycled_pid_is_not_mistaken_for_the_component(tmp_path: Path) -> None:
    component = python("sleeper", PAUSE, tmp_path)
    try:
        assert component.start_ticks is not None
        impostor = component.model_copy(update={"start_ticks": component.start_ticks - 1})
        assert not is_running(impostor)
        assert not group_alive(impostor)
    finally:
        stop_process(component, timeout_s=30)


def test_wait_ready_returns_once_the_probe_answers(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    component = start_process(
        "http",
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        env=os.environ,
        log=tmp_path / "http.log",
        cwd=tmp_path,
    )
    ready: list[str] = []
    try:
        wait_ready(
            [Pending(component, http_probe(f"http://127.0.0.1:{port}/"))],
            timeout_s=120,
            on_ready=lambda c, _: ready.append(c.name),
        )
    finally:
        stop_process(component, timeout_s=30)

    assert ready == ["http"]


def test_wait_ready_fails_at_once_with_the_log_when_the_process_exits(tmp_path: Path) -> None:
    component = python("crash", "import sys; print('boom: no config'); sys.exit(3)", tmp_path)

    with pytest.raises(StartError, match=r"(?s)crash exited while starting.*boom: no config"):
        wait_ready([Pending(component, lambda: False)], timeout_s=120)


def test_wait_ready_names_what_timed_out(tmp_path: Path) -> None:
    component = python("slow", PAUSE, tmp_path)
    try:
        with pytest.raises(StartError, match="slow not ready within"):
            wait_ready([Pending(component, lambda: False)], timeout_s=0.5)
    finally:
        stop_process(component, timeout_s=30)
