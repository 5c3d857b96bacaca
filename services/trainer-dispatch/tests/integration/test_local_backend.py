import os
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from flywheel_runtime.settings import PlatformSettings
from flywheel_testing.wait import wait_for
from flywheel_trainer_dispatch.adapters.local import (
    LocalBackend,
    TrainingOptions,
    process_info,
    run_processes,
)
from flywheel_trainer_dispatch.ports import Phase, RunHandle, RunSpec, RunStatus

pytestmark = pytest.mark.integration

# Plays ``python -m flywheel_vision.train``: what it does depends on the snapshot id it is given.
FAKE_TRAINER = """
import json, os, signal, subprocess, sys
args = sys.argv[sys.argv.index("flywheel_vision.train") + 1:]
arg = dict(zip(args[::2], args[1::2]))
mode = arg["--snapshot-id"]
print("snapshot loaded", flush=True)
print("secret in env:", os.environ.get("FLYWHEEL_S3_SECRET_KEY"), flush=True)
print("database url in env:", "FLYWHEEL_DATABASE_URL" in os.environ, flush=True)
if mode == "succeed":
    result = {"run_id": "mlflow-1", "model_name": arg["--model-name"], "version": "3",
              "base_version": "2", "metrics": {"val_accuracy": 0.5}, "world_size": 1,
              "training_run_id": arg["--training-run-id"]}
    with open(arg["--result-file"], "w") as out:
        json.dump(result, out)
    sys.exit(0)
if mode == "fail":
    print("boom", flush=True)
    sys.exit(3)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
print(f"child {child.pid}", flush=True)
signal.pause()
"""


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    script = tmp_path / "fake-python"
    script.write_text(f"#!{sys.executable}\n{FAKE_TRAINER}")
    script.chmod(0o755)
    return script


@pytest.fixture
def platform() -> PlatformSettings:
    return PlatformSettings(s3_secret_key=SecretStr("s3-secret-value"))


@pytest.fixture
def runs_dir(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "runs"
    yield folder
    # Whatever a failing test left running.
    if folder.exists():
        for run in folder.iterdir():
            for info in run_processes(run.name):
                os.kill(info.pid, signal.SIGKILL)


def _backend(runs_dir: Path, fake_python: Path, platform: PlatformSettings) -> LocalBackend:
    return LocalBackend(
        runs_dir, TrainingOptions(), platform, kill_grace_s=2.0, python=str(fake_python)
    )


def _spec(mode: str) -> RunSpec:
    return RunSpec(
        run_id=uuid.uuid4(),
        project_id="digits",
        model_line="digits-classifier",
        snapshot_id=mode,
        registered_model="digits-classifier",
        correlation_id=uuid.uuid4(),
        excluded_label_ids=(uuid.UUID(int=1),),
    )


async def _until_done(backend: LocalBackend, handle: RunHandle) -> RunStatus:
    async def done() -> RunStatus | None:
        status = await backend.poll(handle)
        return None if status.phase is Phase.RUNNING else status

    return await wait_for(done, message="run ended")


async def _log_shows(backend: LocalBackend, handle: RunHandle, text: str) -> str:
    async def shows() -> str | None:
        log = await backend.read_log(handle)
        return log if log and text in log else None

    return await wait_for(shows, message=f"log shows {text!r}")


async def test_a_run_writes_its_log_and_reports_its_result(
    runs_dir: Path,
    fake_python: Path,
    platform: PlatformSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", "postgresql+asyncpg://user:db-secret@db/x")
    backend = _backend(runs_dir, fake_python, platform)
    spec = _spec("succeed")

    handle = await backend.launch(spec)
    status = await _until_done(backend, handle)

    assert status.phase is Phase.SUCCEEDED
    assert status.exit_code == 0
    assert status.output is not None
    assert (status.output.run_id, status.output.version, status.output.base_version) == (
        "mlflow-1",
        "3",
        "2",
    )
    assert status.output.training_run_id == str(spec.run_id)
    assert "snapshot loaded" in status.log_tail
    assert "secret in env: s3-secret-value" in status.log_tail
    assert "database url in env: False" in status.log_tail
    assert "s3-secret-value" not in " ".join(handle.command)
    log = await backend.read_log(handle)
    assert log is not None
    assert log.startswith(f"# trainer-dispatch run {spec.run_id}: ")
    excluded = runs_dir / str(spec.run_id) / "excluded-labels.json"
    assert excluded.read_text() == f'["{uuid.UUID(int=1)}"]'
    assert handle.command[handle.command.index("--exclude-labels-file") + 1] == str(
        excluded.resolve()
    )


async def test_a_failing_run_reports_its_exit_code_and_log(
    runs_dir: Path, fake_python: Path, platform: PlatformSettings
) -> None:
    backend = _backend(runs_dir, fake_python, platform)

    status = await _until_done(backend, await backend.launch(_spec("fail")))

    assert status.phase is Phase.FAILED
    assert status.exit_code == 3
    assert status.log_tail.endswith("boom")


@pytest.mark.parametrize(("mode", "exit_code"), [("wait", -signal.SIGTERM), ("stubborn", -9)])
async def test_cancel_stops_the_whole_process_group(
    runs_dir: Path, fake_python: Path, platform: PlatformSettings, mode: str, exit_code: int
) -> None:
    backend = _backend(runs_dir, fake_python, platform)
    handle = await backend.launch(_spec(mode))
    log = await _log_shows(backend, handle, "child ")
    child = int(log.split("child ")[1].split()[0])
    leader = process_info(handle.details["pid"])
    assert leader is not None
    assert process_info(child) is not None

    await backend.cancel(handle)

    assert process_info(child) is None
    status = await backend.poll(handle)
    assert status.phase is Phase.FAILED
    assert status.exit_code == exit_code


async def test_a_new_instance_reattaches_a_live_run_and_sees_it_killed(
    runs_dir: Path, fake_python: Path, platform: PlatformSettings
) -> None:
    first = _backend(runs_dir, fake_python, platform)
    handle = await first.launch(_spec("wait"))
    await _log_shows(first, handle, "child ")
    restarted = _backend(runs_dir, fake_python, platform)

    reattached = await restarted.recover(handle)
    # Started but not yet recorded when the old instance stopped: found by its run id.
    found = await restarted.recover(handle.model_copy(update={"details": {}}))
    os.killpg(handle.details["pid"], signal.SIGKILL)
    status = await _until_done(restarted, handle)

    assert reattached.phase is Phase.RUNNING
    assert found.phase is Phase.RUNNING
    assert found.handle is not None
    assert found.handle.details["pid"] == handle.details["pid"]
    assert status.phase is Phase.FAILED
    assert status.exit_code == -signal.SIGKILL
    assert run_processes(str(handle.run_id)) == []


async def test_a_pid_that_is_not_the_runs_process_is_not_reattached(
    runs_dir: Path, fake_python: Path, platform: PlatformSettings
) -> None:
    backend = _backend(runs_dir, fake_python, platform)
    run_id = uuid.uuid4()
    (runs_dir / str(run_id)).mkdir(parents=True)
    (runs_dir / str(run_id) / "train.log").write_text("started\n")
    # This test's own process: alive, but its command line does not carry the run id.
    stranger = RunHandle(backend="local", run_id=run_id, details={"pid": os.getpid()})
    never_launched = RunHandle(backend="local", run_id=uuid.uuid4())

    lost = await backend.recover(stranger)
    absent = await backend.recover(never_launched)

    assert lost.phase is Phase.LOST
    assert lost.log_tail == "started"
    assert absent.phase is Phase.NOT_STARTED
