"""The ``local`` training backend: the training runner as a subprocess on this machine.

A run is ``python -m flywheel_vision.train …``, or ``torchrun --standalone --nproc_per_node=N
-m flywheel_vision.train …`` (started as ``python -m torch.distributed.run``, which is what the
``torchrun`` script runs) when it uses more than one process. The runner calls the model
line's entry point (``--entry-point``, chosen per run by ``TrainingOptions.for_run``). Each run
gets a folder
``<runs_dir>/<run id>/`` holding its log (stdout and stderr of every process), its result file
and the labels it must leave out.

The run is started in a session of its own, so its process group holds the launcher and every
worker and can be signalled as one, and its output goes straight to the log file rather than
through this service: a run outlives a restart of the service. The run id is on the command
line (``--training-run-id``), which is how a process found after a restart is recognised as
ours (``/proc/<pid>/cmdline``) and not some other program that got the same pid.

S3 and MLflow settings reach the job through ``FLYWHEEL_*`` variables, never arguments, so no
secret shows in a process list; the service's own secrets (database, broker) are not passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePath
from typing import Any, Final

import structlog
from pydantic import ValidationError

from flywheel_runtime.settings import PlatformSettings
from flywheel_trainer_dispatch.errors import LaunchError
from flywheel_trainer_dispatch.ports import (
    Phase,
    RunHandle,
    RunSpec,
    RunStatus,
    TrainingOutput,
)
from flywheel_trainer_dispatch.settings import LineTraining
from flywheel_vision.entrypoints import DEFAULT_ENTRY_POINT, EntryPoint

log = structlog.get_logger(__name__)

BACKEND: Final = "local"
TRAIN_MODULE: Final = "flywheel_vision.train"
LOG_FILE: Final = "train.log"
RESULT_FILE: Final = "result.json"
EXCLUDED_FILE: Final = "excluded-labels.json"

TORCHRUN_VARIABLES: Final = frozenset(
    {
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_RUN_ID",
    }
)
"""Left out of a run's environment, so a service started under torchrun cannot leak its own."""

PASSED_THROUGH: Final = frozenset({"FLYWHEEL_GIT_SHA"})
"""``FLYWHEEL_*`` variables of the service that a run inherits (the rest are the service's)."""

LOG_READ_LIMIT: Final = 8 * 1024 * 1024
"""Most bytes of a log the API returns (the end of it)."""

_TAIL_BYTES: Final = 64 * 1024
_STOP_WAIT_S: Final = 10.0
_STOP_POLL_S: Final = 0.05


@dataclass(frozen=True)
class TrainingOptions:
    """How runs train, from the service's settings; ``for_run`` gives one run's."""

    nproc_per_node: int = 1
    threads_per_process: int = 1
    threads_configured: bool = False
    """The threads were set in the settings, not derived from the CPUs and processes."""
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    base_alias: str | None = "champion"
    data_bucket: str = "flywheel-data"
    entry_point: str = DEFAULT_ENTRY_POINT
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    model_lines: Mapping[str, LineTraining] = field(default_factory=dict)

    def for_run(self, spec: RunSpec) -> TrainingOptions:
        """One run's options: what the run asked for, over its line's, over the service's."""
        line = self.model_lines.get(spec.model_line) or LineTraining()
        nproc = spec.nproc_per_node or line.nproc_per_node or self.nproc_per_node
        threads = self.threads_per_process
        if nproc != self.nproc_per_node and not self.threads_configured:
            # The same CPUs shared by another number of processes.
            threads = max(1, self.threads_per_process * self.nproc_per_node // nproc)
        return replace(
            self,
            nproc_per_node=nproc,
            threads_per_process=threads,
            entry_point=spec.entry_point or line.entry_point or self.entry_point,
            hyperparameters={
                **self.hyperparameters,
                **line.hyperparameters,
                **spec.hyperparameters,
            },
        )


def default_threads(nproc_per_node: int, cpus: int | None = None) -> int:
    """Torch threads per process when not configured: the CPUs shared by the processes."""
    return max(1, (cpus or os.cpu_count() or 1) // nproc_per_node)


def build_command(
    spec: RunSpec,
    options: TrainingOptions,
    *,
    python: str,
    result_file: PurePath,
    excluded_file: PurePath | None = None,
    cwd: Path | None = None,
) -> list[str]:
    """The command line of one run; holds ids, paths and hyperparameters, never secrets.

    With ``cwd``, a relative script path of the entry point is made absolute against it (a
    local run starts in its own folder); without, it is passed as the settings spell it.
    """
    options = options.for_run(spec)
    entry = EntryPoint.parse(options.entry_point)
    if cwd is not None:
        entry = entry.resolved(cwd)
    if options.nproc_per_node > 1:
        launcher = [
            python,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={options.nproc_per_node}",
            "-m",
            TRAIN_MODULE,
        ]
    else:
        launcher = [python, "-m", TRAIN_MODULE]
    arguments = [
        "--project-id",
        spec.project_id,
        "--snapshot-id",
        spec.snapshot_id,
        "--model-name",
        spec.registered_model,
        "--model-line",
        spec.model_line,
        "--entry-point",
        str(entry),
        "--data-bucket",
        options.data_bucket,
        "--epochs",
        str(options.epochs),
        "--batch-size",
        str(options.batch_size),
        "--lr",
        repr(options.lr),
        "--seed",
        str(options.seed),
        "--threads",
        str(options.threads_per_process),
        "--correlation-id",
        str(spec.correlation_id),
        "--training-run-id",
        str(spec.run_id),
        "--result-file",
        str(result_file),
    ]
    if options.hyperparameters:
        arguments += ["--hyperparameters", json.dumps(dict(options.hyperparameters))]
    if options.base_alias:
        arguments += ["--base-alias", options.base_alias]
    else:
        arguments.append("--no-base")
    if excluded_file is not None:
        arguments += ["--exclude-labels-file", str(excluded_file)]
    return launcher + arguments


def training_env(
    platform: PlatformSettings, options: TrainingOptions, inherited: Mapping[str, str]
) -> dict[str, str]:
    """The environment of a run: this process's, less its secrets, plus S3 and MLflow."""
    env = {
        name: value
        for name, value in inherited.items()
        if (not name.startswith("FLYWHEEL_") or name in PASSED_THROUGH)
        and name not in TORCHRUN_VARIABLES
    }
    env.update(
        {
            "FLYWHEEL_S3_ENDPOINT": platform.s3_endpoint,
            "FLYWHEEL_S3_ACCESS_KEY": platform.s3_access_key.get_secret_value(),
            "FLYWHEEL_S3_SECRET_KEY": platform.s3_secret_key.get_secret_value(),
            "FLYWHEEL_S3_SECURE": str(platform.s3_secure).lower(),
            "FLYWHEEL_S3_REGION": platform.s3_region,
            "FLYWHEEL_MLFLOW_URI": platform.mlflow_uri,
            "FLYWHEEL_LOG_LEVEL": platform.log_level,
            "FLYWHEEL_LOG_JSON": str(platform.log_json).lower(),
            "FLYWHEEL_ENVIRONMENT": platform.environment,
            # torchrun sets 1 per worker when unset; say it, for one process as for many.
            "OMP_NUM_THREADS": str(options.threads_per_process),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def read_tail(path: Path, *, max_lines: int, max_bytes: int = _TAIL_BYTES) -> str:
    """The last ``max_lines`` lines of a file, reading at most its last ``max_bytes``."""
    try:
        with path.open("rb") as file:
            size = file.seek(0, os.SEEK_END)
            start = max(0, size - max_bytes)
            file.seek(start)
            data = file.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    lines = text.splitlines()
    if start > 0 and lines:
        lines = lines[1:]  # the first line was cut by the byte limit
    return "\n".join(lines[-max_lines:])


# --- processes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    pgid: int
    cmdline: list[str]


def process_info(pid: int, proc: Path = Path("/proc")) -> ProcessInfo | None:
    """A live process's group and command line; None when it is gone or a zombie."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X") or not raw:
        return None
    return ProcessInfo(pid, int(fields[2]), raw.decode(errors="replace").split("\0"))


def runs_process(info: ProcessInfo | None, run_id: str) -> bool:
    """Whether a process belongs to the run: its command line carries the run's id."""
    return info is not None and run_id in info.cmdline


def run_processes(run_id: str, proc: Path = Path("/proc")) -> list[ProcessInfo]:
    """Every live process whose command line carries the run's id."""
    found = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            info = process_info(int(entry.name), proc)
            if runs_process(info, run_id) and info is not None:
                found.append(info)
    return found


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


class LocalBackend:
    """Runs training as subprocesses of this machine; see the module docstring."""

    name = BACKEND

    def __init__(
        self,
        runs_dir: Path,
        options: TrainingOptions,
        platform: PlatformSettings,
        *,
        kill_grace_s: float = 5.0,
        tail_lines: int = 40,
        python: str = sys.executable,
        proc: Path = Path("/proc"),
    ) -> None:
        # Absolute: runs start in their own folder and get the result file's path.
        self._runs_dir = runs_dir.resolve()
        self._options = options
        self._platform = platform
        self._kill_grace_s = kill_grace_s
        self._tail_lines = tail_lines
        self._python = python
        self._proc = proc
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def run_dir(self, run_id: object) -> Path:
        return self._runs_dir / str(run_id)

    # --- launch ---------------------------------------------------------------------------

    async def launch(self, spec: RunSpec) -> RunHandle:
        try:
            return await asyncio.to_thread(self._launch, spec)
        except OSError as error:
            raise LaunchError(
                f"could not start training: {error}", details={"run_id": str(spec.run_id)}
            ) from error

    def _launch(self, spec: RunSpec) -> RunHandle:
        folder = self.run_dir(spec.run_id)
        folder.mkdir(parents=True, exist_ok=True)
        result_file = folder / RESULT_FILE
        result_file.unlink(missing_ok=True)
        excluded_file: Path | None = None
        if spec.excluded_label_ids:
            excluded_file = folder / EXCLUDED_FILE
            excluded_file.write_text(json.dumps([str(i) for i in spec.excluded_label_ids]))
        options = self._options.for_run(spec)
        command = build_command(
            spec,
            options,
            python=self._python,
            result_file=result_file,
            excluded_file=excluded_file,
            cwd=Path.cwd(),
        )
        log_file = folder / LOG_FILE
        with log_file.open("wb") as output:
            output.write(f"# trainer-dispatch run {spec.run_id}: {' '.join(command)}\n".encode())
            output.flush()
            process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=folder,
                env=training_env(self._platform, options, os.environ),
                start_new_session=True,
                close_fds=True,
            )
        self._children[str(spec.run_id)] = process
        log.info("training launched", run_id=str(spec.run_id), pid=process.pid, command=command)
        return RunHandle(
            backend=BACKEND,
            run_id=spec.run_id,
            command=command,
            details={"pid": process.pid, "started": time.time()},
        )

    # --- watch ----------------------------------------------------------------------------

    async def poll(self, handle: RunHandle) -> RunStatus:
        ended, exit_code = self._ended(handle)
        if not ended:
            return RunStatus(phase=Phase.RUNNING, log_tail=self._tail(handle), handle=handle)
        return self._finished(handle, exit_code, lost=exit_code is None)

    async def cancel(self, handle: RunHandle) -> None:
        self._signal_run(handle, signal.SIGTERM)
        if await self._wait_gone(handle, self._kill_grace_s):
            return
        log.warning("training outlived SIGTERM; killing it", run_id=str(handle.run_id))
        self._signal_run(handle, signal.SIGKILL)
        if not await self._wait_gone(handle, _STOP_WAIT_S):
            log.error("training processes outlived SIGKILL", run_id=str(handle.run_id))

    async def recover(self, handle: RunHandle) -> RunStatus:
        run_id = str(handle.run_id)
        pid = self._pid(handle)
        if pid is None:
            # Chosen to start but not recorded as launched: look for it by its run id.
            leaders = [p for p in run_processes(run_id, self._proc) if p.pid == p.pgid]
            if leaders:
                pid = leaders[0].pid
                handle = handle.model_copy(
                    update={
                        "details": {**handle.details, "pid": pid},
                        "command": leaders[0].cmdline,
                    }
                )
        if pid is not None and runs_process(process_info(pid, self._proc), run_id):
            log.info("training re-attached", run_id=run_id, pid=pid)
            return RunStatus(phase=Phase.RUNNING, log_tail=self._tail(handle), handle=handle)
        exit_code = _reap(pid) if pid is not None else None
        if pid is None and not (self.run_dir(run_id) / LOG_FILE).exists():
            return RunStatus(phase=Phase.NOT_STARTED, handle=handle)
        return self._finished(handle, exit_code, lost=True)

    async def read_log(self, handle: RunHandle) -> str | None:
        return await asyncio.to_thread(self._read_log, self.run_dir(handle.run_id) / LOG_FILE)

    @staticmethod
    def _read_log(path: Path) -> str | None:
        try:
            with path.open("rb") as file:
                size = file.seek(0, os.SEEK_END)
                file.seek(max(0, size - LOG_READ_LIMIT))
                return file.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None

    # --- helpers --------------------------------------------------------------------------

    @staticmethod
    def _pid(handle: RunHandle) -> int | None:
        pid = handle.details.get("pid")
        return pid if isinstance(pid, int) else None

    def _ended(self, handle: RunHandle) -> tuple[bool, int | None]:
        """Whether the run's main process has ended, and its exit status when known."""
        run_id = str(handle.run_id)
        child = self._children.get(run_id)
        if child is not None:
            code = child.poll()
            return code is not None, code
        pid = self._pid(handle)
        if pid is None:
            return True, None
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            # Not our child (re-attached after a restart): all we can tell is whether it runs.
            return not runs_process(process_info(pid, self._proc), run_id), None
        if got == 0:
            return False, None
        return True, os.waitstatus_to_exitcode(status)

    async def _wait_gone(self, handle: RunHandle, timeout_s: float) -> bool:
        """Wait until every process of the run is gone; False if some outlive ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._gone(handle):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_STOP_POLL_S)

    def _gone(self, handle: RunHandle) -> bool:
        ended, _ = self._ended(handle)
        return ended and not run_processes(str(handle.run_id), self._proc)

    def _signal_run(self, handle: RunHandle, sig: int) -> None:
        """Signal the run's process group, and any of its processes that left the group."""
        run_id = str(handle.run_id)
        pid = self._pid(handle)
        child = self._children.get(run_id)
        leader_ours = (child is not None and child.poll() is None) or (
            pid is not None and runs_process(process_info(pid, self._proc), run_id)
        )
        if pid is not None and leader_ours:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
        # Workers whose launcher is gone: only processes carrying the run id, one by one, so a
        # recycled process group id can never hit someone else's processes.
        for info in run_processes(run_id, self._proc):
            _signal(info.pid, sig)

    def _finished(self, handle: RunHandle, exit_code: int | None, *, lost: bool) -> RunStatus:
        run_id = str(handle.run_id)
        self._children.pop(run_id, None)
        for straggler in run_processes(run_id, self._proc):
            log.warning("killing a leftover training process", run_id=run_id, pid=straggler.pid)
            _signal(straggler.pid, signal.SIGKILL)
        tail = self._tail(handle)
        output = self._output(handle)
        if output is not None:
            # The version is registered: announce it even if a worker failed on the way out.
            return RunStatus(
                phase=Phase.SUCCEEDED, exit_code=exit_code, output=output, log_tail=tail
            )
        phase = Phase.LOST if lost and exit_code is None else Phase.FAILED
        return RunStatus(phase=phase, exit_code=exit_code, log_tail=tail, handle=handle)

    def _output(self, handle: RunHandle) -> TrainingOutput | None:
        path = self.run_dir(handle.run_id) / RESULT_FILE
        try:
            output = TrainingOutput.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except ValidationError as error:
            log.error("unreadable result file", run_id=str(handle.run_id), error=str(error))
            return None
        if output.training_run_id not in (None, str(handle.run_id)):
            log.error("result file of another run", run_id=str(handle.run_id))
            return None
        return output

    def _tail(self, handle: RunHandle) -> str:
        return read_tail(self.run_dir(handle.run_id) / LOG_FILE, max_lines=self._tail_lines)


def _reap(pid: int) -> int | None:
    """The exit status of a child of this process that ended (None if not ours or running)."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status) if got else None
