"""Online serving throughput: the BFF's ``/predict`` against Triton called directly.

Starts what it needs (S3, MLflow on a PostgreSQL store, RabbitMQ as the tests find it, a real
``tritonserver`` from the ``nvidia-pytriton`` wheel serving one registered DigitNet version
through the Python backend) and runs the BFF as deployed: ``python -m flywheel_inference_bff``
in processes of its own, one with inference logging on and one with it off. The log worker runs
as its own process too, so logs really travel to a durable queue and on to S3.

The same async load generator then sends single-image requests, ``--concurrency`` at a time, to

* ``bff``: ``POST /predict`` with one MNIST PNG as multipart, a bearer token with the predict
  role, inference logging on (the default deployment);
* ``bff-nolog``: the same against the BFF with logging off;
* ``direct``: Triton's v2 HTTP endpoint through ``tritonclient.http.aio``, the same digit as an
  already preprocessed ``float32 [1, 1, 28, 28]`` tensor in binary form. That is what "straight
  against Triton" means: the direct side decodes no PNG, the BFF does (it is its job).

Modes alternate round by round (the order rotates), each round a fixed number of requests
after a warm-up, and the figures are medians over rounds. Everything shares this machine's
CPUs, the load generator included, so the BFF's CPU is taken from Triton's: the ratio says how
much of Triton's throughput survives putting the BFF in front of it on the same cores.

    .venv/bin/python benchmarks/serving.py --requests 2000 --rounds 5

The last line is ``bff_rps=… direct_rps=… ratio=… p99_added_ms=… logging_cost=…``, where
``logging_cost`` is ``1 - bff_rps / bff_nolog_rps`` from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiohttp
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import tritonclient.http.aio as triton_http
from minio import Minio
from minio.deleteobjects import DeleteObject
from mlflow import MlflowClient

from flywheel_clients.registry import CHAMPION, ModelFiles
from flywheel_contracts import InferenceLoggedV1
from flywheel_contracts.topology import dead_letter_queue_name, queue_name
from flywheel_inference_bff.logworker.settings import SERVICE as LOG_WORKER
from flywheel_runtime.auth import generate_dev_key, issue_dev_token
from flywheel_runtime.topology import Topology
from flywheel_serving.repository import ServingOptions, build_model_repository
from flywheel_serving.triton import TritonControl, TritonServer
from flywheel_testing.mlflow_server import MlflowServer, mlflow_for_tests
from flywheel_testing.net import free_port
from flywheel_testing.postgres import postgres_server, sqlalchemy_url, throwaway_database
from flywheel_testing.rabbit import delete_names, rabbit_server, unique_namespace
from flywheel_testing.s3 import S3Server, s3_for_tests
from flywheel_testing.serving import digit_model_files
from flywheel_vision.data import load_mnist, to_png
from flywheel_vision.export import labels_json
from flywheel_vision.preprocess import INPUT_NAME, OUTPUT_NAME, preprocess

PROJECT = "bench-digits"
MODES = ("direct", "bff", "bff-nolog")


# --- servers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Servers:
    rabbit: str
    postgres: str
    s3: S3Server
    mlflow: MlflowServer


@contextlib.contextmanager
def servers(workdir: Path) -> Iterator[Servers]:
    """RabbitMQ and PostgreSQL as the test fixtures find them; S3 and MLflow started here."""
    with (
        rabbit_server() as rabbit,
        postgres_server() as postgres,
        s3_for_tests(workdir / "s3") as s3,
        mlflow_for_tests(workdir / "mlflow", s3=s3, postgres_admin_url=postgres) as mlflow,
    ):
        yield Servers(rabbit, postgres, s3, mlflow)


def register_version(tracking_uri: str, folder: Path, files: ModelFiles) -> str:
    """Register ``files`` as a new version (a run's ``model/`` folder, as the trainer leaves it)
    and point the champion alias at it."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment_id = client.create_experiment(f"{files.name}-{uuid.uuid4().hex[:6]}")
    run = client.create_run(experiment_id)
    artifacts = folder / "artifacts"
    artifacts.mkdir(parents=True)
    (artifacts / "model.onnx").write_bytes(files.onnx)
    (artifacts / "labels.json").write_bytes(labels_json(files.labels))
    client.log_artifacts(run.info.run_id, str(artifacts), artifact_path="model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(files.name)
    version = client.create_model_version(
        files.name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    client.set_registered_model_alias(files.name, CHAMPION, str(version.version))
    return str(version.version)


@contextlib.contextmanager
def triton_serving(
    workdir: Path, files: ModelFiles, options: ServingOptions
) -> Iterator[TritonServer]:
    """``tritonserver`` on a fresh repository serving ``files``, loaded and ready."""
    repository = workdir / "repository"
    build_model_repository(repository, files.name, [files], options)
    with TritonServer.start(repository, log_path=workdir / "tritonserver.log") as server:

        async def load() -> None:
            async with TritonControl(server.http_url) as control:
                await control.load(files.name)
                await control.wait_model_ready(files.name, files.version, timeout=60)

        asyncio.run(load())
        yield server


def remove_bucket(s3: S3Server, bucket: str) -> None:
    client = Minio(s3.endpoint, s3.access_key, s3.secret_key, secure=False)
    if not client.bucket_exists(bucket):
        return
    doomed = (DeleteObject(o.object_name) for o in client.list_objects(bucket, recursive=True))
    errors = list(client.remove_objects(bucket, doomed))
    if errors:
        raise RuntimeError(f"could not empty {bucket}: {errors[:3]}")
    client.remove_bucket(bucket)


# --- service processes --------------------------------------------------------------------------


@dataclass
class Process:
    """A service started as ``python -m <module>`` in a session of its own."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    output: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 90) -> None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.tail()}"
                )
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{self.url}/readyz") as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready within {timeout} s:\n{self.tail()}")
            await asyncio.sleep(0.1)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 20) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        # uvicorn's worker processes share the group and may outlive their parent.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


def start_process(name: str, module: str, env: dict[str, str], workdir: Path) -> Process:
    output = workdir / f"{name}.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(  # noqa: S603 - this interpreter, a fixed module
            [sys.executable, "-m", module],
            env=os.environ | env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    port = int(env.get("FLYWHEEL_BFF_HTTP_PORT") or env["FLYWHEEL_LOGWORKER_HTTP_PORT"])
    return Process(name, process, port, output)


def platform_env(servers: Servers, triton: TritonServer, database_url: str) -> dict[str, str]:
    return {
        "FLYWHEEL_RABBIT_URL": servers.rabbit,
        "FLYWHEEL_DATABASE_URL": database_url,
        "FLYWHEEL_S3_ENDPOINT": servers.s3.endpoint,
        "FLYWHEEL_S3_ACCESS_KEY": servers.s3.access_key,
        "FLYWHEEL_S3_SECRET_KEY": servers.s3.secret_key,
        "FLYWHEEL_MLFLOW_URI": servers.mlflow.tracking_uri,
        "FLYWHEEL_TRITON_URL": triton.http_url,
        "FLYWHEEL_LOG_LEVEL": "WARNING",
    }


def bff_env(
    platform: dict[str, str],
    *,
    key: str,
    model: str,
    namespace: str,
    bucket: str,
    workers: int,
    log_enabled: bool,
) -> dict[str, str]:
    return platform | {
        "FLYWHEEL_BFF_HTTP_PORT": str(free_port()),
        "FLYWHEEL_BFF_HTTP_WORKERS": str(workers),
        "FLYWHEEL_BFF_NAMESPACE": namespace,
        "FLYWHEEL_BFF_DB_SCHEMA": f"bench_bff_{uuid.uuid4().hex[:8]}",
        "FLYWHEEL_BFF_DATA_BUCKET": bucket,
        "FLYWHEEL_BFF_RESULTS_BUCKET": bucket,
        "FLYWHEEL_BFF_DEFAULT_MODEL_LINE": model,
        "FLYWHEEL_BFF_PROJECT_IDS": json.dumps({model: PROJECT}),
        "FLYWHEEL_BFF_AUTH__DEV_SIGNING_KEY": key,
        "FLYWHEEL_BFF_LOG_ENABLED": str(log_enabled).lower(),
    }


# --- load generation ----------------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")


def group_cpu_s(group: int) -> float:
    """CPU seconds (user + system) of the live processes of process group ``group``.

    Read from ``/proc``: on a machine shared with other work, CPU per request says what each
    side costs regardless of how much CPU it was given.
    """
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # the process ended meanwhile
            continue
        # After the command: state, ppid, pgrp, …; utime and stime are the 12th and 13th.
        if int(fields[2]) == group:
            total += int(fields[11]) + int(fields[12])
    return total / _TICKS


@dataclass
class Round:
    mode: str
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms: float
    """CPU of the load generator (this process) per request."""
    group_cpu_ms: dict[str, float] = field(default_factory=dict)
    """CPU per request of each measured process group (BFF, Triton, log worker)."""


@dataclass
class Results:
    rounds: list[Round] = field(default_factory=list)

    def of(self, mode: str) -> list[Round]:
        return [r for r in self.rounds if r.mode == mode]

    def median(self, mode: str, value: Callable[[Round], float]) -> float:
        return statistics.median(value(r) for r in self.of(mode))

    def cpu_ms(self, mode: str, group: str) -> float:
        """Median CPU per request that ``group`` spent in ``mode``'s rounds."""
        return statistics.median(r.group_cpu_ms[group] for r in self.of(mode))


async def run_load(
    count: int,
    concurrency: int,
    send: Callable[[int], Awaitable[object]],
    groups: dict[str, int] | None = None,
) -> Round:
    """``count`` requests from ``concurrency`` clients, each sending as soon as it has its
    answer; throughput, latency percentiles and the CPU each of ``groups`` spent."""
    groups = groups or {}
    latencies: list[float] = []
    next_index = 0

    async def client() -> None:
        nonlocal next_index
        while next_index < count:
            index = next_index
            next_index += 1
            started = time.perf_counter()
            await send(index)
            latencies.append(time.perf_counter() - started)

    before = {name: group_cpu_s(group) for name, group in groups.items()}
    cpu = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    spent = {name: group_cpu_s(group) - before[name] for name, group in groups.items()}
    ms = np.asarray(latencies) * 1000
    return Round(
        mode="",
        rps=count / elapsed,
        p50_ms=float(np.percentile(ms, 50)),
        p99_ms=float(np.percentile(ms, 99)),
        cpu_ms=(time.process_time() - cpu) / count * 1000,
        group_cpu_ms={name: seconds / count * 1000 for name, seconds in spent.items()},
    )


class Client(Protocol):
    """One mode's side of the load generator: request ``index`` and wait for the answer."""

    async def predict(self, index: int) -> int: ...

    async def close(self) -> None: ...


class BffClient:
    """Posts one PNG per request to ``/predict`` as multipart, the way a tool uploads it."""

    def __init__(self, url: str, token: str, pngs: list[bytes], concurrency: int) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency),
            timeout=aiohttp.ClientTimeout(total=60),
        )
        self._url = f"{url}/predict"
        self._headers = {"Authorization": f"Bearer {token}"}
        self._pngs = pngs

    async def predict(self, index: int) -> int:
        form = aiohttp.FormData()
        png = self._pngs[index % len(self._pngs)]
        form.add_field("image", png, filename="digit.png", content_type="image/png")
        async with self._session.post(self._url, data=form, headers=self._headers) as response:
            body = await response.read()
            if response.status != 200:
                raise RuntimeError(f"/predict answered {response.status}: {body[:300]!r}")
        return int(json.loads(body)["predicted_class"])

    async def close(self) -> None:
        await self._session.close()


class DirectClient:
    """Triton's v2 HTTP API with a preprocessed tensor, binary in and out."""

    def __init__(
        self,
        url: str,
        model: str,
        version: str,
        tensors: list[npt.NDArray[np.float32]],
        concurrency: int,
    ) -> None:
        self._client = triton_http.InferenceServerClient(url, conn_limit=concurrency)
        self._model = model
        self._version = version
        self._tensors = tensors

    async def predict(self, index: int) -> int:
        tensor = self._tensors[index % len(self._tensors)]
        image = triton_http.InferInput(INPUT_NAME, [1, *tensor.shape], "FP32")
        image.set_data_from_numpy(tensor[np.newaxis], binary_data=True)
        output = triton_http.InferRequestedOutput(OUTPUT_NAME, binary_data=True)
        result = await self._client.infer(
            self._model, [image], model_version=self._version, outputs=[output]
        )
        return int(np.argmax(result.as_numpy(OUTPUT_NAME)[0]))

    async def close(self) -> None:
        await self._client.close()


async def logs_dropped(session: aiohttp.ClientSession, url: str) -> float:
    """``flywheel_bff_inference_logs_dropped_total`` over every reason, from ``/metrics``."""
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    pattern = re.compile(r"^flywheel_bff_inference_logs_dropped_total(\{[^}]*\})? (\S+)$", re.M)
    return sum(float(value) for _, value in pattern.findall(text))


# --- the benchmark ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    """The servers, the registered model version and the Triton serving it."""

    servers: Servers
    files: ModelFiles
    triton: TritonServer
    workdir: Path


@contextlib.contextmanager
def serving_stack(workdir: Path, options: ServingOptions, seed: int = 7) -> Iterator[Stack]:
    """Everything the BFF stands on: servers, one DigitNet version as champion, Triton."""
    with servers(workdir) as running:
        files = digit_model_files(f"bench-digits-{uuid.uuid4().hex[:8]}", "1", seed=seed)
        version = register_version(running.mlflow.tracking_uri, workdir / "model", files)
        files = files.model_copy(update={"version": version})
        with triton_serving(workdir / "triton", files, options) as triton:
            yield Stack(running, files, triton, workdir)


@dataclass(frozen=True)
class Services:
    """BFF processes by name, the log worker, and a token with the predict role."""

    bffs: dict[str, Process]
    log_worker: Process
    token: str


@contextlib.asynccontextmanager
async def services(stack: Stack, bffs: dict[str, bool], *, workers: int) -> AsyncIterator[Services]:
    """The log worker and one BFF process per entry of ``bffs`` (name → logging on), ready;
    stopped afterwards, with their database, queues, exchanges and bucket removed."""
    key = generate_dev_key("EC")
    token = issue_dev_token(key, subject="bench", roles=["predict"], expires_in=7200)
    namespace = unique_namespace()
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    started: list[Process] = []
    async with throwaway_database(stack.servers.postgres) as dsn:
        platform = platform_env(stack.servers, stack.triton, sqlalchemy_url(dsn))
        try:
            worker = start_process(
                "log-worker",
                "flywheel_inference_bff.logworker",
                platform
                | {
                    "FLYWHEEL_LOGWORKER_HTTP_PORT": str(free_port()),
                    "FLYWHEEL_LOGWORKER_NAMESPACE": namespace,
                    "FLYWHEEL_LOGWORKER_LOGS_BUCKET": bucket,
                    "FLYWHEEL_LOGWORKER_MAX_WAIT_S": "2",
                },
                stack.workdir,
            )
            started.append(worker)
            processes = {}
            for name, log_enabled in bffs.items():
                env = bff_env(
                    platform,
                    key=key,
                    model=stack.files.name,
                    namespace=namespace,
                    bucket=bucket,
                    workers=workers,
                    log_enabled=log_enabled,
                )
                processes[name] = start_process(name, "flywheel_inference_bff", env, stack.workdir)
                started.append(processes[name])
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                for process in started:
                    await process.wait_ready(session)
            yield Services(processes, worker, token)
        finally:
            for process in reversed(started):
                await asyncio.to_thread(process.stop)
            topology = Topology(namespace=namespace)
            log_queue = namespace + queue_name(LOG_WORKER, InferenceLoggedV1.routing_key())
            await delete_names(
                stack.servers.rabbit,
                queues=[log_queue, dead_letter_queue_name(log_queue)],
                exchanges=[
                    topology.events_exchange.name,
                    topology.inference_exchange.name,
                    topology.dead_letter_exchange.name,
                ],
            )
            await asyncio.to_thread(remove_bucket, stack.servers.s3, bucket)


def digits(count: int) -> tuple[list[bytes], list[npt.NDArray[np.float32]]]:
    """The first ``count`` MNIST test digits as PNGs and as preprocessed tensors."""
    images, _ = load_mnist("test", limit=count)
    pngs = [to_png(image) for image in images]
    return pngs, [preprocess(png) for png in pngs]


def reference_classes(onnx: bytes, tensors: list[npt.NDArray[np.float32]]) -> list[int]:
    """Classes onnxruntime in this process gives ``tensors``: what every path must answer."""
    session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: np.stack(tensors)})
    return [int(i) for i in np.argmax(logits, axis=1)]


async def measure(args: argparse.Namespace, stack: Stack) -> Results:
    pngs, tensors = digits(args.images)
    triton, files = stack.triton, stack.files
    results = Results()
    modes = {"bff": True, "bff-nolog": False}
    async with services(stack, modes, workers=args.workers) as running:
        bffs = running.bffs

        def client(mode: str) -> Client:
            # A fresh client per round: pooled connections idle through other modes' rounds
            # are closed by the server meanwhile.
            if mode == "direct":
                return DirectClient(
                    triton.http_url, files.name, files.version, tensors, args.concurrency
                )
            return BffClient(bffs[mode].url, running.token, pngs, args.concurrency)

        async def load(mode: str, count: int, groups: dict[str, int]) -> Round:
            sending = client(mode)
            try:
                return await run_load(count, args.concurrency, sending.predict, groups)
            finally:
                await sending.close()

        expected = reference_classes(files.onnx, tensors[:20])
        for mode in MODES:
            checked = client(mode)
            try:
                answers = [await checked.predict(i) for i in range(20)]
            finally:
                await checked.close()
            if answers != expected:
                raise RuntimeError(f"{mode} answered {answers}, expected {expected}")
        # Whose CPU a mode spends (the log worker's only while logs arrive).
        groups = {
            "direct": {"triton": triton.pid},
            "bff": {
                "bff": bffs["bff"].process.pid,
                "triton": triton.pid,
                "log-worker": running.log_worker.process.pid,
            },
            "bff-nolog": {"bff": bffs["bff-nolog"].process.pid, "triton": triton.pid},
        }
        for mode in MODES:
            await load(mode, args.warmup, {})
        for number in range(args.rounds):
            shift = number % len(MODES)
            for mode in MODES[shift:] + MODES[:shift]:
                measured = await load(mode, args.requests, groups[mode])
                measured.mode = mode
                results.rounds.append(measured)
                spent = " ".join(
                    f"{name}_cpu_ms={ms:.2f}" for name, ms in measured.group_cpu_ms.items()
                )
                print(
                    f"round {number + 1} {mode:<9} rps={measured.rps:7.1f} "
                    f"p50_ms={measured.p50_ms:6.1f} p99_ms={measured.p99_ms:6.1f} "
                    f"generator_cpu_ms={measured.cpu_ms:.2f} {spent} "
                    f"load={os.getloadavg()[0]:.2f}",
                    flush=True,
                )
        async with aiohttp.ClientSession() as session:
            dropped = await logs_dropped(session, bffs["bff"].url)
        print(f"inference logs dropped by the BFF: {dropped:.0f}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per mode")
    parser.add_argument("--warmup", type=int, default=300, help="requests per mode first")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers per BFF")
    parser.add_argument("--instances", type=int, default=1, help="Triton model instances")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads/instance")
    parser.add_argument(
        "--queue-delay-us", type=int, default=500, help="Triton's dynamic batching delay"
    )
    parser.add_argument("--images", type=int, default=500, help="distinct MNIST test digits")
    args = parser.parse_args()

    options = ServingOptions(
        flavour="python",
        instance_count=args.instances,
        intra_op_threads=args.threads,
        max_queue_delay_microseconds=args.queue_delay_us,
    )
    load_before = os.getloadavg()
    with (
        tempfile.TemporaryDirectory(prefix="flywheel-bench-serving-") as tmp,
        serving_stack(Path(tmp), options) as stack,
    ):
        print(
            f"serving: {args.requests} requests x {args.rounds} rounds per mode, "
            f"concurrency {args.concurrency}, BFF uvicorn workers {args.workers} (one process "
            f"each with logging on and off; log worker as its own process), Triton instances "
            f"{args.instances} (python backend, onnxruntime threads {args.threads}, "
            f"max_queue_delay {args.queue_delay_us} us, max_batch {options.max_batch_size}), "
            f"{os.cpu_count()} CPUs, load before {load_before[0]:.2f}",
            flush=True,
        )
        results = asyncio.run(measure(args, stack))
    load_after = os.getloadavg()
    bff = results.median("bff", lambda r: r.rps)
    nolog = results.median("bff-nolog", lambda r: r.rps)
    direct = results.median("direct", lambda r: r.rps)
    p99_added = results.median("bff", lambda r: r.p99_ms) - results.median(
        "direct", lambda r: r.p99_ms
    )
    for mode in MODES:
        names = results.of(mode)[0].group_cpu_ms
        spent = ", ".join(f"{name} {results.cpu_ms(mode, name):.2f}" for name in names)
        print(f"median CPU ms per request, {mode}: {spent}")
    print(
        f"medians: bff p50_ms={results.median('bff', lambda r: r.p50_ms):.1f} "
        f"p99_ms={results.median('bff', lambda r: r.p99_ms):.1f}, "
        f"bff-nolog rps={nolog:.1f}, "
        f"direct p50_ms={results.median('direct', lambda r: r.p50_ms):.1f} "
        f"p99_ms={results.median('direct', lambda r: r.p99_ms):.1f}; "
        f"load after {load_after[0]:.2f}"
    )
    print(
        f"bff_rps={bff:.1f} direct_rps={direct:.1f} ratio={bff / direct:.3f} "
        f"p99_added_ms={p99_added:.1f} logging_cost={1 - bff / nolog:.3f}"
    )


if __name__ == "__main__":
    main()
