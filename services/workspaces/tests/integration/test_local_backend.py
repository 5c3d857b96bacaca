import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from flywheel_testing.wait import wait_for
from flywheel_workspaces.adapters.local import IDE_FILE, LocalBackend, newest_mtime
from flywheel_workspaces.ports import BackendPhase, BackendStatus, Workspace

from ..fakes import stop_everything_under, workspace_of

pytestmark = pytest.mark.integration


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    built = LocalBackend(tmp_path / "envs", stop_grace_s=2)
    yield built
    await built.close()
    await stop_everything_under(tmp_path / "envs")


async def ready(backend: LocalBackend, workspace: Workspace) -> BackendStatus:
    async def answered() -> BackendStatus | None:
        status = await backend.status(workspace)
        assert status.phase in (BackendPhase.PENDING, BackendPhase.READY), status
        return status if status.phase is BackendPhase.READY else None

    return await wait_for(answered, timeout=60, interval=0.1, message="IDE answers")


def pid_of(backend: LocalBackend, workspace: Workspace) -> int:
    record = backend.folder(workspace.workspace_id) / "run" / IDE_FILE
    return int(json.loads(record.read_text())["pid"])


def cmdline(pid: int) -> str:
    return " ".join(Path(f"/proc/{pid}/cmdline").read_text().split("\0"))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] != "Z"


async def test_an_environment_is_created_reports_ready_and_is_deleted(
    backend: LocalBackend,
) -> None:
    workspace = workspace_of(uuid.uuid4())
    assert (await backend.status(workspace)).phase is BackendPhase.GONE

    await backend.create(workspace)
    status = await ready(backend, workspace)

    assert status.connection is not None
    assert status.connection.url is not None
    assert status.connection.ide in ("code-server", "jupyter", "http-server")
    async with httpx.AsyncClient(trust_env=False) as client:
        answer = await client.get(status.connection.url)
    assert answer.status_code < 500
    home = backend.home(workspace.workspace_id)
    assert (home / ".venv" / "bin" / "python").exists()
    assert (home / ".venv" / "pyvenv.cfg").read_text().count("include-system-site-packages = true")
    record = (backend.folder(workspace.workspace_id) / "run" / IDE_FILE).stat()
    assert record.st_mode & 0o777 == 0o600
    pid = pid_of(backend, workspace)
    assert str(home) in cmdline(pid)

    await backend.delete(workspace)

    assert not alive(pid)
    assert not backend.folder(workspace.workspace_id).exists()
    assert (await backend.status(workspace)).phase is BackendPhase.GONE
    await backend.delete(workspace)  # idempotent


async def test_the_stand_in_ide_says_so_and_serves_the_home_directory(
    tmp_path: Path,
) -> None:
    backend = LocalBackend(tmp_path / "envs", ide="http-server", stop_grace_s=2)
    workspace = workspace_of(uuid.uuid4(), ide="jupyter")
    try:
        await backend.create(workspace)
        (backend.home(workspace.workspace_id) / "notes.txt").write_text("hello")
        status = await ready(backend, workspace)
        assert status.connection is not None
        assert status.connection.url is not None
        async with httpx.AsyncClient(trust_env=False) as client:
            served = await client.get(status.connection.url + "notes.txt")
    finally:
        await backend.delete(workspace)
        await backend.close()

    assert status.connection.ide == "http-server"
    assert status.connection.token is None
    assert "stand-in IDE" in (status.message or "")
    assert served.text == "hello"


async def test_stop_ends_the_ide_and_keeps_the_home_which_the_next_create_reuses(
    backend: LocalBackend,
) -> None:
    workspace = workspace_of(uuid.uuid4())
    await backend.create(workspace)
    await ready(backend, workspace)
    kept = backend.home(workspace.workspace_id) / "train.py"
    kept.write_text("print('kept')\n")
    pid = pid_of(backend, workspace)

    await backend.stop(workspace)

    assert not alive(pid)
    assert kept.read_text() == "print('kept')\n"
    assert (await backend.status(workspace)).phase is BackendPhase.GONE
    await backend.stop(workspace)  # idempotent

    await backend.create(workspace)
    await ready(backend, workspace)
    assert kept.exists()
    assert pid_of(backend, workspace) != pid
    await backend.delete(workspace)


async def test_create_twice_starts_one_ide_and_a_restarted_service_finds_it(
    backend: LocalBackend, tmp_path: Path
) -> None:
    workspace = workspace_of(uuid.uuid4())
    await backend.create(workspace)
    pid = pid_of(backend, workspace)
    await backend.create(workspace)
    assert pid_of(backend, workspace) == pid

    restarted = LocalBackend(tmp_path / "envs", stop_grace_s=2)
    try:
        status = await ready(restarted, workspace)
        assert status.phase is BackendPhase.READY
        await restarted.stop(workspace)
    finally:
        await restarted.close()
    assert not alive(pid)


async def test_an_ide_that_dies_is_reported_failed(backend: LocalBackend) -> None:
    workspace = workspace_of(uuid.uuid4())
    await backend.create(workspace)
    await ready(backend, workspace)

    os.killpg(pid_of(backend, workspace), signal.SIGKILL)

    async def failed() -> BackendStatus | None:
        status = await backend.status(workspace)
        return status if status.phase is BackendPhase.FAILED else None

    status = await wait_for(failed, timeout=10, message="IDE reported dead")
    assert "exited" in (status.message or "")
    await backend.delete(workspace)


async def test_activity_is_the_newest_change_under_home(backend: LocalBackend) -> None:
    workspace = workspace_of(uuid.uuid4())
    await backend.create(workspace)
    status = await ready(backend, workspace)
    notebook = backend.home(workspace.workspace_id) / "project" / "nb.ipynb"
    notebook.parent.mkdir()
    notebook.write_text("{}")
    later = datetime.now(UTC) + timedelta(hours=1)
    os.utime(notebook, (later.timestamp(), later.timestamp()))

    seen = (await backend.status(workspace)).last_activity_at

    assert status.last_activity_at is not None
    assert seen is not None
    assert abs((seen - later).total_seconds()) < 1
    assert newest_mtime(backend.home(workspace.workspace_id), limit=1) != seen  # bounded scan
    await backend.delete(workspace)


async def test_an_ide_started_but_never_recorded_is_replaced_not_left_behind(
    backend: LocalBackend,
) -> None:
    workspace = workspace_of(uuid.uuid4())
    await backend.create(workspace)
    await ready(backend, workspace)
    orphan = pid_of(backend, workspace)
    (backend.folder(workspace.workspace_id) / "run" / IDE_FILE).unlink()  # a crash lost it

    await backend.create(workspace)

    await wait_for(lambda: _gone(orphan), timeout=10, message="orphan IDE killed")
    assert pid_of(backend, workspace) != orphan
    await ready(backend, workspace)
    await backend.delete(workspace)


async def _gone(pid: int) -> bool:
    return not alive(pid)
