"""Triton Inference Server: the server bundled in ``nvidia-pytriton``, and its control API.

``TritonServer`` runs the wheel's ``tritonserver`` on a plain model repository, for tests and
the local stack; in production Triton runs in its own container and only ``TritonControl`` is
used. The wheel expects PyTriton to start it, so three things are arranged here that PyTriton
would otherwise do: the interpreter's own ``libpython`` ahead of the wheel's libraries (else
the Python backend's stub loads the system's libpython and fails), this environment's ``bin``
first on ``PATH`` (else the stub cannot import onnxruntime), and a backend directory holding
the Python backend with the stub for this interpreter's version (the wheel keeps stubs for
every version apart, so one is linked in beside the backend).

``TritonControl`` loads and unloads models through Triton's repository API (explicit model
control): new versions go into service without restarting the server.

Run ``python -m flywheel_serving.triton --repository DIR`` to serve a repository in the
foreground.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar

import aiohttp
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http.aio as http_aio
from pydantic import BaseModel, ConfigDict
from tritonclient.utils import InferenceServerException

from flywheel_runtime.errors import DependencyUnavailableError
from flywheel_serving.errors import (
    ModelLoadError,
    ModelNotReadyError,
    TritonError,
    TritonNotInstalledError,
    TritonStartError,
)

__all__ = [
    "ModelControlMode",
    "ModelIndexEntry",
    "TritonControl",
    "TritonInstallation",
    "TritonProtocol",
    "TritonServer",
    "main",
]

DISTRIBUTION: Final = "nvidia-pytriton"
LOCALHOST: Final = "127.0.0.1"

ModelControlMode = Literal["explicit", "poll", "none"]
TritonProtocol = Literal["http", "grpc"]

_T = TypeVar("_T")
_PYTHON_BACKEND_FILES: Final = ("libtriton_python.so", "triton_python_backend_utils.py")
_STUB: Final = "triton_python_backend_stub"
_WILDCARD_HOSTS: Final = frozenset({"", "0.0.0.0", "::"})  # noqa: S104 - recognised, not bound
# gRPC statuses (as tritonclient spells them) and HTTP statuses that mean "not answering".
_UNAVAILABLE: Final = frozenset({"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "503"})


@dataclass(frozen=True)
class _Ports:
    http: int
    grpc: int
    metrics: int


@dataclass(frozen=True)
class TritonInstallation:
    """Where the ``nvidia-pytriton`` wheel keeps the server, its libraries and the backend."""

    binary: Path
    python_backend: Path
    """Folder with ``libtriton_python.so`` and ``triton_python_backend_utils.py``."""
    stub: Path
    """The Python backend's stub for this interpreter's ``major.minor``."""
    libs: Path
    """``nvidia_pytriton.libs``: the shared libraries the server was linked against."""

    @classmethod
    def find(cls) -> TritonInstallation:
        """The installed wheel's files; ``TritonNotInstalledError`` when any is missing."""
        try:
            dist = metadata.distribution(DISTRIBUTION)
        except metadata.PackageNotFoundError as exc:
            raise TritonNotInstalledError(
                f"tritonserver comes with the {DISTRIBUTION} wheel, which is not installed "
                "(pip install 'flywheel-serving[local]')"
            ) from exc
        site = Path(str(dist.locate_file("")))
        server = site / "pytriton" / "tritonserver"
        python = f"{sys.version_info.major}.{sys.version_info.minor}"
        found = cls(
            binary=server / "bin" / "tritonserver",
            python_backend=server / "backends" / "python",
            stub=server / "python_backend_stubs" / python / _STUB,
            libs=site / "nvidia_pytriton.libs",
        )
        wanted = [found.binary, found.stub, found.libs]
        wanted += [found.python_backend / name for name in _PYTHON_BACKEND_FILES]
        missing = [str(path) for path in wanted if not path.exists()]
        if missing:
            raise TritonNotInstalledError(
                f"the {DISTRIBUTION} wheel lacks files this Python ({python}) needs",
                details={"missing": missing},
            )
        return found

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) prepared for ``tritonserver``."""
        env = dict(os.environ if base is None else base)
        libdir = sysconfig.get_config_var("LIBDIR")
        library_path = [str(libdir)] if libdir else []
        library_path.append(str(self.libs))
        if inherited := env.get("LD_LIBRARY_PATH"):
            library_path.append(inherited)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(library_path)
        # The executable's own folder, not its resolved target: that is the venv's bin.
        python_bin = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([python_bin, env.get("PATH") or os.defpath])
        return env

    def backend_directory(self, target: Path) -> Path:
        """Assemble ``<target>/python`` from links to the wheel's backend and stub."""
        python = target / "python"
        python.mkdir(parents=True, exist_ok=True)
        sources = [self.python_backend / name for name in _PYTHON_BACKEND_FILES] + [self.stub]
        for source in sources:
            link = python / source.name
            link.unlink(missing_ok=True)
            link.symlink_to(source)
        return target


class TritonServer:
    """A running ``tritonserver`` process; build it with ``start``, end it with ``stop``."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        *,
        repository: Path | str,
        host: str,
        ports: _Ports,
        workdir: Path,
        log_path: Path,
    ) -> None:
        self._process = process
        self._repository = repository
        self._client_host = LOCALHOST if host in _WILDCARD_HOSTS else host
        self._ports = ports
        self._workdir = workdir
        self._log_path = log_path

    @classmethod
    def start(
        cls,
        repository: Path | str,
        *,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        log_path: Path | None = None,
        model_control: ModelControlMode = "explicit",
        startup_timeout: float = 60.0,
        extra_args: Sequence[str] = (),
        host: str = LOCALHOST,
        env: Mapping[str, str] | None = None,
        attempts: int = 3,
    ) -> TritonServer:
        """Start ``tritonserver`` on ``repository`` and return once it answers as live.

        ``repository`` is a folder or a URI Triton reads (``s3://host:port/bucket/prefix``,
        with credentials in ``env``). Ports left ``None`` are chosen free; when one is taken
        before Triton binds it, the start is retried on fresh ports up to ``attempts`` times.
        Output goes to ``log_path`` (default: a file removed on ``stop``). A server that exits
        or is not live within ``startup_timeout`` raises ``TritonStartError`` with its log tail.
        """
        if isinstance(repository, Path) and not repository.is_dir():
            raise TritonStartError(
                "the model repository is not a folder", details={"path": str(repository)}
            )
        installation = TritonInstallation.find()
        workdir = Path(tempfile.mkdtemp(prefix="flywheel-triton-"))
        try:
            backends = installation.backend_directory(workdir / "backends")
            log = log_path or workdir / "tritonserver.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            environment = installation.environment() | dict(env or {})
            chosen_freely = None in (http_port, grpc_port, metrics_port)
            attempt = 1
            while True:
                ports = _pick_ports(host, http_port, grpc_port, metrics_port)
                command = _command(
                    installation, repository, backends, host, ports, model_control, extra_args
                )
                with log.open("ab") as output:
                    process = subprocess.Popen(  # noqa: S603 - the wheel's binary, our arguments
                        command,
                        stdout=output,
                        stderr=subprocess.STDOUT,
                        env=environment,
                        cwd=workdir,
                        # Its own process group, so the backend stubs it forks can be reaped.
                        start_new_session=True,
                    )
                server = cls(
                    process,
                    repository=repository,
                    host=host,
                    ports=ports,
                    workdir=workdir,
                    log_path=log,
                )
                try:
                    exited = server._wait_live(startup_timeout)
                except BaseException:  # not live in time, or interrupted: no orphan server
                    _terminate(process, 10.0)
                    raise
                if exited is None:
                    return server
                _terminate(process, 0)  # reaps whatever it forked before quitting
                tail = _tail(log)
                if not (chosen_freely and "already in use" in tail and attempt < attempts):
                    raise TritonStartError(
                        f"tritonserver exited with {exited} while starting:\n{tail}"
                    )
                attempt += 1
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP endpoint, the form tritonclient takes."""
        return f"{self._client_host}:{self._ports.http}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint, the form tritonclient takes."""
        return f"{self._client_host}:{self._ports.grpc}"

    @property
    def metrics_url(self) -> str:
        """Full URL of the Prometheus endpoint: it is scraped over plain HTTP, not tritonclient."""
        return f"http://{self._client_host}:{self._ports.metrics}/metrics"

    @property
    def repository(self) -> Path:
        """The local repository folder; ``ValueError`` for a server reading a remote one."""
        if not isinstance(self._repository, Path):
            raise ValueError(f"this server reads a remote repository: {self._repository}")
        return self._repository

    @property
    def repository_uri(self) -> str:
        """What ``--model-repository`` says: a folder or an ``s3://`` URI."""
        return str(self._repository)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def log_path(self) -> Path:
        return self._log_path

    @property
    def running(self) -> bool:
        return self._process.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """Block until the server exits; its exit status."""
        return self._process.wait(timeout)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self._log_path, lines)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (Triton drains requests and unloads models), SIGKILL after ``timeout``.

        Idempotent. Whatever is left of its process group (backend stubs of a server that
        died abruptly) is killed too.
        """
        _terminate(self._process, timeout)
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_live(self, timeout: float) -> int | None:
        """None once ``/v2/health/live`` answers 200, or the exit status of a server that quit.

        ``TritonStartError`` when it is still not live after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            connection = http.client.HTTPConnection(self._client_host, self._ports.http, timeout=2)
            try:
                connection.request("GET", "/v2/health/live")
                status = connection.getresponse().status
            except OSError as exc:
                last = exc
            else:
                if status == 200:
                    return None
                last = f"HTTP {status}"
            finally:
                connection.close()
            # Waiting on the process doubles as the poll interval and notices an early exit.
            with contextlib.suppress(subprocess.TimeoutExpired):
                return self._process.wait(timeout=0.05)
        raise TritonStartError(
            f"tritonserver was not live within {timeout}s ({last!r}):\n{_tail(self._log_path)}"
        )


class ModelIndexEntry(BaseModel):
    """One model version Triton's repository index lists."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: str | None = None
    state: str | None = None
    """``READY``, ``UNAVAILABLE``, ``LOADING`` …; None for a model never loaded."""
    reason: str | None = None


class TritonControl:
    """Async client of Triton's health and model-repository APIs, over HTTP or gRPC.

    The underlying client is created on first use, inside the running event loop, so a
    ``TritonControl`` can be built anywhere (in ``create_app``). An unreachable server raises
    ``DependencyUnavailableError``; a refused load ``ModelLoadError`` with Triton's reason.
    """

    def __init__(
        self, url: str, *, protocol: TritonProtocol = "http", timeout: float = 120.0
    ) -> None:
        """``url`` is ``host:port``; ``timeout`` bounds each call, loads included."""
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        self._url = url
        self._protocol = protocol
        self._timeout = timeout
        self._client: Any = None

    @property
    def url(self) -> str:
        return self._url

    @property
    def protocol(self) -> TritonProtocol:
        return self._protocol

    async def server_ready(self) -> bool:
        """Whether Triton is ready (live, and every model it was told to load is loaded)."""
        return bool(await self._call("check readiness", lambda c: c.is_server_ready(**self._kw)))

    async def load(self, model: str, *, config: str | None = None) -> None:
        """(Re)load ``model`` from the repository; returns once Triton finished loading.

        Triton loads the versions the config names beside the ones in service and swaps them
        when all are ready, so requests keep being answered throughout; versions the config
        no longer names are unloaded. ``config`` (JSON) overrides the ``config.pbtxt``.
        """
        await self._call(
            "load",
            lambda c: c.load_model(model, config=config, **self._kw),
            model=model,
            refusal=ModelLoadError,
        )

    async def unload(self, model: str) -> None:
        """Unload every version of ``model``; in-flight requests still complete.

        Triton answers at once and unloads in the background: poll ``model_ready`` when the
        moment it is gone matters.
        """
        await self._call("unload", lambda c: c.unload_model(model, **self._kw), model=model)

    async def model_ready(self, model: str, version: str | None = None) -> bool:
        """Whether ``model`` (or that version of it) serves requests; False if Triton lacks it."""
        try:
            ready = await self._call(
                "check readiness",
                lambda c: c.is_model_ready(model, version or "", **self._kw),
                model=model,
            )
        except TritonError:
            return False
        return bool(ready)

    async def wait_model_ready(
        self,
        model: str,
        version: str | None = None,
        timeout: float = 60.0,  # noqa: ASYNC109 - a deadline over many calls, not one
        *,
        interval: float = 0.1,
    ) -> None:
        """Poll until the model (version) is ready; ``ModelNotReadyError`` after ``timeout``.

        An unreachable server counts as not ready yet: it may be starting.
        """
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            try:
                if await self.model_ready(model, version):
                    return
            except DependencyUnavailableError as exc:
                last = exc
            if time.monotonic() >= deadline:
                raise ModelNotReadyError(
                    f"model not ready within {timeout}s",
                    details={"model": model, "version": version},
                ) from last
            await asyncio.sleep(interval)

    async def repository_index(self) -> list[ModelIndexEntry]:
        """Every model version in the repository, loaded or not, with its state."""
        if self._protocol == "grpc":
            answer = await self._call(
                "read the repository index",
                lambda c: c.get_model_repository_index(as_json=True, **self._kw),
            )
            entries = answer.get("models", [])
        else:
            entries = await self._call(
                "read the repository index", lambda c: c.get_model_repository_index()
            )
        return [ModelIndexEntry.model_validate(entry) for entry in entries]

    async def close(self) -> None:
        """Close the connections; the control may be used again afterwards (it reconnects)."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def _kw(self) -> dict[str, Any]:
        # gRPC takes a per-call deadline; the HTTP client's session timeout covers each call.
        return {"client_timeout": self._timeout} if self._protocol == "grpc" else {}

    def _connect(self) -> Any:
        if self._client is None:
            if self._protocol == "grpc":
                self._client = grpc_aio.InferenceServerClient(self._url)
            else:
                self._client = http_aio.InferenceServerClient(self._url, conn_timeout=self._timeout)
        return self._client

    async def _call(
        self,
        operation: str,
        call: Callable[[Any], Awaitable[_T]],
        *,
        model: str | None = None,
        refusal: type[TritonError] = TritonError,
    ) -> _T:
        """Run one client call; translate its failures into the platform's errors."""
        details = {"operation": operation} | ({"model": model} if model is not None else {})
        try:
            return await call(self._connect())
        except InferenceServerException as exc:
            if str(exc.status()) in _UNAVAILABLE:
                raise DependencyUnavailableError("Triton is unavailable", details=details) from exc
            reason = exc.message() or str(exc)
            subject = f" model {model!r}" if model is not None else ""
            raise refusal(
                f"Triton could not {operation}{subject}: {reason}",
                details=details | {"triton_status": str(exc.status())},
            ) from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise DependencyUnavailableError("Triton is unavailable", details=details) from exc


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the server, SIGKILL it after ``timeout``; then kill what is left of its group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _command(
    installation: TritonInstallation,
    repository: Path | str,
    backends: Path,
    host: str,
    ports: _Ports,
    model_control: ModelControlMode,
    extra_args: Sequence[str],
) -> list[str]:
    """The ``tritonserver`` command line; ``extra_args`` come last and so prevail."""
    return [
        str(installation.binary),
        f"--model-repository={repository}",
        f"--model-control-mode={model_control}",
        f"--backend-directory={backends}",
        f"--http-address={host}",
        f"--http-port={ports.http}",
        f"--grpc-address={host}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-address={host}",
        f"--metrics-port={ports.metrics}",
        # A model that fails to load (a bad canary) must not take the server, and the
        # champion it serves, out of rotation: readiness means "serving".
        "--strict-readiness=false",
        *extra_args,
    ]


def _pick_ports(
    host: str, http_port: int | None, grpc_port: int | None, metrics_port: int | None
) -> _Ports:
    wanted = [http_port, grpc_port, metrics_port]
    free = iter(_free_ports(wanted.count(None), LOCALHOST if host in _WILDCARD_HOSTS else host))
    http_, grpc_, metrics_ = (port if port is not None else next(free) for port in wanted)
    return _Ports(http=http_, grpc=grpc_, metrics=metrics_)


def _free_ports(count: int, host: str) -> list[int]:
    """``count`` distinct ports nothing listens on (all held until each is chosen)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    # Triton's start-up banner is a wide ASCII table that says nothing about the failure.
    kept = [line for line in text.splitlines() if not line.startswith(("+", "|"))]
    return "\n".join(kept[-lines:])


def main(argv: Sequence[str] | None = None) -> int:
    """Serve a model repository in the foreground until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m flywheel_serving.triton",
        description="Run the Triton bundled with nvidia-pytriton on a model repository.",
    )
    parser.add_argument("--repository", required=True, help="model repository folder or s3:// URI")
    parser.add_argument("--host", default=LOCALHOST, help="address to listen on")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--model-control", choices=["explicit", "poll", "none"], default="explicit")
    parser.add_argument(
        "--load-model", action="append", default=[], help="model to load at start (repeatable)"
    )
    parser.add_argument("--log-path", type=Path, help="Triton's log file (default: temporary)")
    parser.add_argument("--startup-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)

    repository: Path | str = args.repository
    if "://" not in args.repository:
        repository = Path(args.repository).resolve()
        repository.mkdir(parents=True, exist_ok=True)

    # SIGTERM (docker stop, a supervisor) and SIGHUP (a closed terminal) end the server as
    # cleanly as Ctrl-C does: Triton runs in a session of its own and would outlive us.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.default_int_handler)
    server = TritonServer.start(
        repository,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_path=args.log_path,
        model_control=args.model_control,
        startup_timeout=args.startup_timeout,
        extra_args=[f"--load-model={name}" for name in args.load_model],
        host=args.host,
    )
    try:
        # Inside the try: a stop asked for right after the announcement (a supervisor that
        # waited for it) interrupts the print itself.
        print(
            f"triton pid {server.pid}: http {server.http_url}, grpc {server.grpc_url}, "
            f"metrics {server.metrics_url}; log {server.log_path}",
            flush=True,
        )
        code = server.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        server.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
