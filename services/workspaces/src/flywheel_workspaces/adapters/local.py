"""The ``local`` backend: an environment is a process on this machine with a folder of its own.

It is for laptops and tests: the API, quotas, queue, TTLs and idle shutdown run end to end
without a cluster. Isolation stops at a folder, a venv and a process group: the image, GPUs,
CPU and memory of the request are not applied, and the IDE listens on 127.0.0.1 only.

Per environment, under ``<root>/<workspace id>/``:

* ``home/`` is the home directory (``$HOME`` of the IDE) with a venv in ``home/.venv``
  (``python -m venv --system-site-packages``; without pip unless asked, which takes seconds
  instead of milliseconds: ``python -m pip`` in the venv then runs the system's pip and installs
  into the venv). It is the local stand-in for the home volume: **kept on stop** (TTL expiry,
  idle shutdown), removed on delete.
* ``run/ide.json`` holds the IDE's pid, port, kind, URL and token (mode 0600); ``run/ide.log``
  its output.

**The IDE** is the first installed of: the one the request asks for, code-server (on
``PATH``), JupyterLab or Notebook (importable by this interpreter). When none is, a stand-in
serves: ``python -m http.server`` run by the environment's venv, bound to 127.0.0.1 and
serving the home directory. ``Connection.ide`` says which answers at the URL, and the
environment's message says when it is the stand-in. A token or password goes into the IDE's
environment, never onto its command line; the service's own ``FLYWHEEL_*`` variables (its
secrets) are left out.

**Ready** means the IDE's port answers HTTP, whatever the status. **Activity** is the newest
modification time under ``home/`` (at most ``activity_scan_limit`` entries are looked at):
files the engineer saves, and what the IDE writes there while used (code-server's
``heartbeat`` file, Jupyter's checkpoints and kernel files). Pages served are not activity, so
the stand-in's visitors are not seen.

**Stop** ends the IDE's process group (IDE, kernels, terminals: it runs in a session of its
own) with SIGTERM, then SIGKILL after ``stop_grace_s``, and any process still naming the
environment's folder; **delete** then removes the folder. The IDE outlives a restart of the
service, which finds it again through ``ide.json``; a process counts as the environment's only
while its command line names the environment's folder, so a recycled pid is never taken for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

import httpx
import structlog
from pydantic import BaseModel, ValidationError

from flywheel_workspaces.errors import EnvironmentSetupError
from flywheel_workspaces.ports import BackendPhase, BackendStatus, Connection, Workspace

log = structlog.get_logger(__name__)

BACKEND: Final = "local"
IDE_FILE: Final = "ide.json"
IDE_LOG: Final = "ide.log"
LOCALHOST: Final = "127.0.0.1"
STAND_IN: Final = "http-server"

IdeChoice = Literal["auto", "code-server", "jupyter", "http-server"]

STAND_IN_MESSAGE: Final = (
    "stand-in IDE: neither code-server nor JupyterLab is installed here, so the URL is "
    "python -m http.server serving the home directory (install one for a real IDE)"
)

_STOP_POLL_S: Final = 0.05
_KILL_WAIT_S: Final = 5.0
_TAIL_BYTES: Final = 2048


class IdeRecord(BaseModel):
    """What ``create`` started, as ``run/ide.json`` keeps it."""

    pid: int
    port: int
    kind: str
    url: str
    token: str | None = None
    message: str | None = None
    started_at: float


@dataclass(frozen=True)
class _Launch:
    kind: str
    port: int
    command: list[str]
    url: str
    token: str | None
    secret_env: dict[str, str]
    message: str | None


def free_port() -> int:
    """A port nothing listens on at this moment, on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def newest_mtime(root: Path, limit: int) -> datetime | None:
    """The newest modification time of ``root`` and what is under it (symlinks not followed),
    looking at no more than ``limit`` entries; None when ``root`` is gone."""
    try:
        newest = root.stat().st_mtime
    except FileNotFoundError:
        return None
    seen = 0
    folders = [root]
    while folders and seen < limit:
        folder = folders.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    seen += 1
                    with contextlib.suppress(FileNotFoundError):
                        newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
                        if entry.is_dir(follow_symlinks=False):
                            folders.append(Path(entry.path))
                    if seen >= limit:
                        break
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
    return datetime.fromtimestamp(newest, UTC)


def _cmdline(pid: int, proc: Path) -> list[str] | None:
    """A live process's command line; None when it is gone or a zombie."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # "pid (comm) state ...": comm may hold spaces and parentheses.
    state = stat[stat.rindex(")") + 2 :].split()[0]
    if state in ("Z", "X") or not raw:
        return None
    return raw.decode(errors="replace").split("\0")


def _names(cmdline: list[str] | None, folder: Path) -> bool:
    return cmdline is not None and any(str(folder) in argument for argument in cmdline)


def jupyter_module() -> str | None:
    """``jupyterlab`` or ``notebook``, whichever this interpreter can run first."""
    for module in ("jupyterlab", "notebook"):
        with contextlib.suppress(ImportError, ValueError):
            if importlib.util.find_spec(module) is not None:
                return module
    return None


class LocalBackend:
    """Runs environments as processes of this machine; see the module docstring."""

    name = BACKEND

    def __init__(
        self,
        root: Path,
        *,
        ide: IdeChoice = "auto",
        venv_pip: bool = False,
        python: str = sys.executable,
        stop_grace_s: float = 5.0,
        probe_timeout_s: float = 1.0,
        activity_scan_limit: int = 20_000,
        proc: Path = Path("/proc"),
    ) -> None:
        self._root = root.resolve()
        self._ide = ide
        self._venv_pip = venv_pip
        self._python = python
        self._stop_grace_s = stop_grace_s
        self._activity_scan_limit = activity_scan_limit
        self._proc = proc
        self._children: dict[uuid.UUID, subprocess.Popen[bytes]] = {}
        # Never through a proxy: the IDE is on this machine's loopback.
        self._http = httpx.AsyncClient(timeout=probe_timeout_s, trust_env=False)

    def folder(self, workspace_id: uuid.UUID) -> Path:
        return self._root / str(workspace_id)

    def home(self, workspace_id: uuid.UUID) -> Path:
        return self.folder(workspace_id) / "home"

    # --- the port -------------------------------------------------------------------------

    async def create(self, workspace: Workspace) -> None:
        await asyncio.to_thread(self._create, workspace)

    async def status(self, workspace: Workspace) -> BackendStatus:
        record, alive, activity, tail = await asyncio.to_thread(self._inspect, workspace)
        if record is None:
            return BackendStatus(phase=BackendPhase.GONE, message="no IDE process")
        if not alive:
            return BackendStatus(
                phase=BackendPhase.FAILED,
                last_activity_at=activity,
                message=f"the IDE ({record.kind}) exited" + (f": {tail}" if tail else ""),
            )
        if not await self._answers(record.port):
            return BackendStatus(
                phase=BackendPhase.PENDING,
                last_activity_at=activity,
                message=f"starting {record.kind}",
            )
        return BackendStatus(
            phase=BackendPhase.READY,
            connection=Connection(url=record.url, token=record.token, ide=record.kind),
            last_activity_at=activity,
            message=record.message,
        )

    async def stop(self, workspace: Workspace) -> None:
        """End the IDE and everything it started; the folder (home and venv) stays."""
        folder = self.folder(workspace.workspace_id)
        record = self._record(folder)
        workspace_id = workspace.workspace_id
        self._signal(workspace_id, folder, record, signal.SIGTERM)
        if not await self._wait_gone(workspace_id, folder, record, self._stop_grace_s):
            log.warning("IDE outlived SIGTERM; killing it", workspace_id=str(workspace_id))
            self._signal(workspace_id, folder, record, signal.SIGKILL)
            if not await self._wait_gone(workspace_id, folder, record, _KILL_WAIT_S):
                log.error("IDE processes outlived SIGKILL", workspace_id=str(workspace_id))
        self._children.pop(workspace_id, None)
        (folder / "run" / IDE_FILE).unlink(missing_ok=True)
        log.info("local environment stopped", workspace_id=str(workspace_id))

    async def delete(self, workspace: Workspace) -> None:
        """Stop, then remove the environment's folder, home directory included."""
        await self.stop(workspace)
        folder = self.folder(workspace.workspace_id)
        await asyncio.to_thread(_remove, folder)
        log.info("local environment deleted", workspace_id=str(workspace.workspace_id))

    async def close(self) -> None:
        """Close the HTTP client; environments keep running (a restart finds them again)."""
        await self._http.aclose()

    # --- create ---------------------------------------------------------------------------

    def _create(self, workspace: Workspace) -> None:
        folder = self.folder(workspace.workspace_id)
        record = self._record(folder)
        if record is not None and _names(_cmdline(record.pid, self._proc), folder):
            return  # already running: create is idempotent
        # An IDE started by a create that crashed before recording it would hold on forever.
        for orphan in self._processes(folder):
            log.warning("killing an unrecorded IDE process", pid=orphan, folder=str(folder))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(orphan, signal.SIGKILL)
        home, run = folder / "home", folder / "run"
        try:
            home.mkdir(parents=True, exist_ok=True)
            run.mkdir(exist_ok=True)
            venv = home / ".venv"
            if not (venv / "bin" / "python").exists():
                self._make_venv(venv)
            launch = self._launch(workspace, home, venv)
            env = self._env(home, venv) | launch.secret_env
            with (run / IDE_LOG).open("ab") as output:
                output.write(f"# {workspace.workspace_id}: {' '.join(launch.command)}\n".encode())
                output.flush()
                process = subprocess.Popen(  # noqa: S603 - a fixed program and our own arguments
                    launch.command,
                    cwd=home,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
        except OSError as error:
            raise EnvironmentSetupError(
                f"could not start the environment's IDE: {error.strerror or error}",
                details={"workspace_id": str(workspace.workspace_id)},
            ) from error
        self._children[workspace.workspace_id] = process
        record = IdeRecord(
            pid=process.pid,
            port=launch.port,
            kind=launch.kind,
            url=launch.url,
            token=launch.token,
            message=launch.message,
            started_at=time.time(),
        )
        _write_private(run / IDE_FILE, record.model_dump_json())
        log.info(
            "local environment started",
            workspace_id=str(workspace.workspace_id),
            ide=launch.kind,
            pid=process.pid,
            url=launch.url,
        )

    def _make_venv(self, venv: Path) -> None:
        command = [self._python, "-m", "venv", "--system-site-packages"]
        if not self._venv_pip:
            command.append("--without-pip")
        try:
            subprocess.run(  # noqa: S603 - our own interpreter and arguments
                [*command, str(venv)], check=True, capture_output=True, timeout=600
            )
        except subprocess.CalledProcessError as error:
            tail = error.stderr.decode(errors="replace")[-_TAIL_BYTES:].strip()
            raise EnvironmentSetupError(f"could not create the venv: {tail}") from error
        except subprocess.TimeoutExpired as error:
            raise EnvironmentSetupError("creating the venv took more than 600 s") from error

    def _launch(self, workspace: Workspace, home: Path, venv: Path) -> _Launch:
        asked = workspace.spec.ide
        order = [asked, "code-server", "jupyter"] if self._ide == "auto" else [self._ide]
        port = free_port()
        for kind in dict.fromkeys(order):
            note = None if kind == asked else f"{asked} is not available here; {kind} serves"
            if kind == "code-server" and (program := shutil.which("code-server")) is not None:
                password = secrets.token_urlsafe(24)
                return _Launch(
                    kind,
                    port,
                    [
                        program,
                        "--bind-addr",
                        f"{LOCALHOST}:{port}",
                        "--auth",
                        "password",
                        "--disable-telemetry",
                        "--disable-update-check",
                        "--user-data-dir",
                        str(home / ".local" / "share" / "code-server"),
                        str(home),
                    ],
                    f"http://{LOCALHOST}:{port}/?folder={home}",
                    password,
                    {"PASSWORD": password},
                    note,
                )
            if kind == "jupyter" and (module := jupyter_module()) is not None:
                token = secrets.token_urlsafe(24)
                return _Launch(
                    kind,
                    port,
                    [
                        self._python,
                        "-m",
                        module,
                        "--no-browser",
                        f"--ip={LOCALHOST}",
                        f"--port={port}",
                        "--ServerApp.port_retries=0",
                        f"--ServerApp.root_dir={home}",
                    ],
                    f"http://{LOCALHOST}:{port}/{'lab' if module == 'jupyterlab' else 'tree'}",
                    token,
                    {"JUPYTER_TOKEN": token},
                    note,
                )
        return _Launch(
            STAND_IN,
            port,
            [
                str(venv / "bin" / "python"),
                "-m",
                "http.server",
                "--bind",
                LOCALHOST,
                "--directory",
                str(home),
                str(port),
            ],
            f"http://{LOCALHOST}:{port}/",
            None,
            {},
            STAND_IN_MESSAGE,
        )

    @staticmethod
    def _env(home: Path, venv: Path) -> dict[str, str]:
        """This process's environment less the service's own settings, in the venv."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
        env.pop("PYTHONHOME", None)
        env |= {
            "HOME": str(home),
            "VIRTUAL_ENV": str(venv),
            "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
        }
        return env

    # --- status ---------------------------------------------------------------------------

    def _inspect(self, workspace: Workspace) -> tuple[IdeRecord | None, bool, datetime | None, str]:
        folder = self.folder(workspace.workspace_id)
        record = self._record(folder)
        if record is None:
            return None, False, None, ""
        child = self._children.get(workspace.workspace_id)
        if child is not None:
            child.poll()  # reap it if it ended, so it is not seen as a zombie
        alive = _names(_cmdline(record.pid, self._proc), folder)
        activity = newest_mtime(folder / "home", self._activity_scan_limit)
        tail = "" if alive else _tail(folder / "run" / IDE_LOG)
        return record, alive, activity, tail

    async def _answers(self, port: int) -> bool:
        try:
            await self._http.get(f"http://{LOCALHOST}:{port}/")
        except httpx.HTTPError:
            return False
        return True

    @staticmethod
    def _record(folder: Path) -> IdeRecord | None:
        try:
            return IdeRecord.model_validate_json((folder / "run" / IDE_FILE).read_bytes())
        except FileNotFoundError:
            return None
        except ValidationError:
            log.error("unreadable IDE record", folder=str(folder))
            return None

    # --- stop -----------------------------------------------------------------------------

    def _processes(self, folder: Path) -> list[int]:
        """Every live process whose command line names the environment's folder."""
        found: list[int] = []
        if not folder.exists():
            return found
        for entry in self._proc.iterdir():
            if entry.name.isdigit() and _names(_cmdline(int(entry.name), self._proc), folder):
                found.append(int(entry.name))
        return found

    def _signal(
        self, workspace_id: uuid.UUID, folder: Path, record: IdeRecord | None, sig: int
    ) -> None:
        if record is not None and _names(_cmdline(record.pid, self._proc), folder):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(record.pid, sig)
        # Whatever left the group: only processes naming the folder, one by one, so a
        # recycled process group id can never hit someone else's processes.
        for pid in self._processes(folder):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        child = self._children.get(workspace_id)
        if child is not None:
            child.poll()

    async def _wait_gone(
        self, workspace_id: uuid.UUID, folder: Path, record: IdeRecord | None, timeout_s: float
    ) -> bool:
        deadline = time.monotonic() + timeout_s
        child = self._children.get(workspace_id)
        while True:
            if child is not None:
                child.poll()
            leader = record is not None and _names(_cmdline(record.pid, self._proc), folder)
            if not leader and not self._processes(folder):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_STOP_POLL_S)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by this user only, replacing it at once."""
    partial = path.with_suffix(".tmp")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    os.replace(partial, path)


def _tail(path: Path) -> str:
    """The last line or two of the IDE's log, to say why it exited."""
    try:
        with path.open("rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - _TAIL_BYTES))
            lines = file.read().decode(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return ""
    return " | ".join(line.strip() for line in lines[-2:])


def _remove(folder: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(folder)
