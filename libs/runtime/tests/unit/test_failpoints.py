"""Failpoints kill the process at an armed point only, and say so first."""

import signal
import subprocess
import sys

import pytest

from flywheel_runtime.failpoints import ENV, armed, failpoint

PROGRAM = """
from flywheel_runtime.failpoints import failpoint
failpoint("handler.done", ["threshold.reached"])
print("passed handler.done", flush=True)
failpoint("handler.done", ["labels.saved"])
print("passed the second one", flush=True)
"""


def run(points: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROGRAM],
        env={ENV: points},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_an_armed_point_with_its_detail_kills_the_process_there() -> None:
    result = run("outbox.published, handler.done:labels.saved")
    assert result.returncode == -signal.SIGKILL
    assert result.stdout == "passed handler.done\n"
    assert "failpoint handler.done:labels.saved reached" in result.stderr


def test_a_point_armed_without_detail_fires_for_any_detail() -> None:
    result = run("handler.done")
    assert result.returncode == -signal.SIGKILL
    assert result.stdout == ""


def test_nothing_happens_where_no_point_is_armed() -> None:
    result = run("handler.done:model.trained")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "passed handler.done\npassed the second one\n"


def test_unset_means_nothing_armed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert armed() == frozenset()
    failpoint("handler.done", ["labels.saved"])  # returns: the test goes on
    monkeypatch.setenv(ENV, " a , b:c ,")
    assert armed() == {"a", "b:c"}
