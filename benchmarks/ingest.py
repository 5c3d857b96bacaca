"""Label ingest throughput against raw S3 PUTs of the same images.

Starts (or, through ``FLYWHEEL_TEST_*``, uses) PostgreSQL, RabbitMQ and S3, runs the labeling
app in this process and posts N distinct MNIST-sized PNGs as single multipart labels from 32
concurrent clients. In the same run it PUTs the same images straight to S3 with the minio SDK
at the same concurrency. Every label costs at least one S3 PUT (its image), so the ratio says
how much of the storage's speed the service keeps; the group commit is what keeps the snapshot
segment PUT and the transaction from being paid once per label.

    .venv/bin/python benchmarks/ingest.py --labels 2000

``--transport process`` (default) runs the service as deployed, ``python -m flywheel_labeling``
in its own process, and posts over HTTP; ``asgi`` calls the app in this process through httpx's
ASGI transport; ``uvicorn`` serves it in this process on a free port. ``--per-request N`` posts
N labels per request through ``labels:batch`` (base64 images) instead of one multipart label;
by default it measures one label per request (what a tool posting each annotation does) and
then 16 per request (bulk imports, pseudo labels), each against its own raw-PUT reference.
Each mode prints ``labels_per_s=… s3_puts_per_s=… ratio=…``; the last line is the bulk mode.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json as json_module
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
import uvicorn
from fastapi import FastAPI
from minio import Minio
from PIL import Image
from pydantic import SecretStr

from flywheel_labeling.main import create_app
from flywheel_labeling.settings import LabelingSettings
from flywheel_runtime.auth import AuthSettings, generate_dev_key, issue_dev_token
from flywheel_runtime.settings import PlatformSettings
from flywheel_testing.net import free_port
from flywheel_testing.postgres import postgres_server, sqlalchemy_url, throwaway_database
from flywheel_testing.rabbit import delete_names, rabbit_server, unique_namespace
from flywheel_testing.s3 import S3Server, s3_for_tests

PROJECT = "bench-digits"
CLASSES = [str(d) for d in range(10)]


def digit_pngs(count: int, seed: int) -> list[bytes]:
    """Distinct 28x28 grayscale PNGs: a few blurred strokes plus noise, like MNIST digits."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        canvas = np.zeros((28, 28), dtype=np.float32)
        for _ in range(3):
            y, x = rng.integers(4, 24, size=2)
            canvas[max(0, y - 3) : y + 3, max(0, x - 8) : x + 8] += rng.random()
        canvas += rng.random((28, 28)) * 0.2
        pixels = (np.clip(canvas, 0, 1) * 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(out, "PNG")
        images.append(out.getvalue())
    return images


async def run_clients(
    count: int, concurrency: int, work: Callable[[int], Awaitable[None]]
) -> float:
    """Items ``0..count-1`` handled by ``concurrency`` clients; returns items per second."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(count):
        queue.put_nowait(index)

    async def client() -> None:
        while not queue.empty():
            await work(queue.get_nowait())

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return count / (time.perf_counter() - started)


@contextlib.contextmanager
def servers(workdir: Path) -> Iterator[tuple[str, str, S3Server]]:
    """RabbitMQ, PostgreSQL (admin URL) and S3, as the test fixtures find or start them."""
    with rabbit_server() as rabbit, postgres_server() as postgres, s3_for_tests(workdir) as s3:
        yield rabbit, postgres, s3


class AiohttpClient:
    """The load generator's HTTP client for the out-of-process service.

    httpx costs several ms of CPU per multipart request, which on a 2-core machine would be
    measured as the service's slowness; aiohttp keeps the generator's share small.
    """

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def post(
        self,
        path: str,
        *,
        headers: dict[str, str],
        json: object | None = None,
        data: dict[str, str] | None = None,
        files: dict[str, tuple[str, bytes, str]] | None = None,
    ) -> Answer:
        body: aiohttp.FormData | None = None
        if files is not None:
            body = aiohttp.FormData()
            for name, value in (data or {}).items():
                body.add_field(name, value)
            for name, (filename, content, content_type) in files.items():
                body.add_field(name, content, filename=filename, content_type=content_type)
        async with self._session.post(path, headers=headers, json=json, data=body) as response:
            return Answer(response.status, await response.text())

    async def get(self, path: str, *, headers: dict[str, str] | None = None) -> Answer:
        async with self._session.get(path, headers=headers) as response:
            return Answer(response.status, await response.text())


@dataclass
class Answer:
    status_code: int
    text: str

    def json(self) -> Any:
        return json_module.loads(self.text)

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise RuntimeError(f"{self.status_code}: {self.text[:500]}")


@contextlib.asynccontextmanager
async def service_process(settings: LabelingSettings) -> AsyncIterator[Any]:
    """``python -m flywheel_labeling`` configured through its environment, and a client of it."""
    port = free_port()
    platform = settings.platform
    env = {
        **os.environ,
        "FLYWHEEL_RABBIT_URL": platform.rabbit_url.get_secret_value(),
        "FLYWHEEL_DATABASE_URL": platform.database_url.get_secret_value(),
        "FLYWHEEL_S3_ENDPOINT": platform.s3_endpoint,
        "FLYWHEEL_S3_ACCESS_KEY": platform.s3_access_key.get_secret_value(),
        "FLYWHEEL_S3_SECRET_KEY": platform.s3_secret_key.get_secret_value(),
        "FLYWHEEL_LOG_LEVEL": "WARNING",
        "FLYWHEEL_LABELING_HTTP_PORT": str(port),
        "FLYWHEEL_LABELING_HTTP_WORKERS": str(settings.http_workers),
        "FLYWHEEL_LABELING_NAMESPACE": settings.namespace,
        "FLYWHEEL_LABELING_DATA_BUCKET": settings.data_bucket,
        "FLYWHEEL_LABELING_AUTH__DEV_SIGNING_KEY": (
            settings.auth.dev_signing_key.get_secret_value()
            if settings.auth.dev_signing_key
            else ""
        ),
    }
    process = subprocess.Popen(  # noqa: ASYNC220 - started once, before measuring
        [sys.executable, "-m", "flywheel_labeling"], env=env, start_new_session=True
    )
    connector = aiohttp.TCPConnector(limit=64)
    try:
        async with aiohttp.ClientSession(
            f"http://127.0.0.1:{port}",
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=60),
        ) as session:
            client = AiohttpClient(session)
            deadline = time.monotonic() + 60
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"labeling exited with {process.returncode}")
                with contextlib.suppress(aiohttp.ClientError):
                    if (await client.get("/readyz")).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("labeling did not become ready within 60 s")
                await asyncio.sleep(0.1)
            yield client
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            await asyncio.to_thread(process.wait)


@contextlib.asynccontextmanager
async def app_client(
    app: FastAPI, settings: LabelingSettings, transport: str
) -> AsyncIterator[Any]:
    """A client of the running app: its own process, straight into ASGI, or in-process uvicorn."""
    if transport == "process":
        async with service_process(settings) as client:
            yield client
        return
    if transport == "asgi":
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://labeling", timeout=60
            ) as client,
        ):
            yield client
        return
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on"
        )
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()
        await asyncio.sleep(0.05)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=60, limits=limits
        ) as client:
            yield client
    finally:
        server.should_exit = True
        await serving


@dataclass
class Result:
    labels_per_s: float
    s3_puts_per_s: float
    snapshots: int
    cpu_ms_per_label: float


async def measure(args: argparse.Namespace) -> Result:
    images = digit_pngs(args.warmup + args.labels, seed=args.seed)
    with tempfile.TemporaryDirectory() as workdir, servers(Path(workdir)) as (rabbit, pg, s3):
        async with throwaway_database(pg) as dsn:
            key = generate_dev_key("RSA")
            bucket = f"bench-{uuid.uuid4().hex[:12]}"
            settings = LabelingSettings(
                platform=PlatformSettings(
                    rabbit_url=SecretStr(rabbit),
                    database_url=SecretStr(sqlalchemy_url(dsn)),
                    s3_endpoint=s3.endpoint,
                    s3_access_key=SecretStr(s3.access_key),
                    s3_secret_key=SecretStr(s3.secret_key),
                    log_level="WARNING",
                ),
                auth=AuthSettings(dev_signing_key=SecretStr(key)),
                http_workers=args.workers,
                namespace=unique_namespace(),
                data_bucket=bucket,
            )
            app = create_app(settings)
            admin = issue_dev_token(key, subject="admin", roles=["admin"])
            labeler = issue_dev_token(key, subject="bench", username="bench", roles=["labeler"])
            try:
                async with app_client(app, settings, args.transport) as client:
                    created = await client.post(
                        "/v1/projects",
                        json={"project_id": PROJECT, "name": "bench", "class_names": CLASSES},
                        headers={"Authorization": f"Bearer {admin}"},
                    )
                    created.raise_for_status()

                    auth = {"Authorization": f"Bearer {labeler}"}
                    per_request = args.per_request

                    async def post_batch(first: int) -> None:
                        items = [
                            {
                                "image_base64": base64.b64encode(images[i]).decode(),
                                "class_name": CLASSES[i % 10],
                            }
                            for i in range(first, first + per_request)
                        ]
                        response = await client.post(
                            f"/v1/projects/{PROJECT}/labels:batch",
                            json={"items": items},
                            headers=auth,
                        )
                        results = response.json().get("results", [])
                        if response.status_code != 200 or any(
                            r["status"] != "created" for r in results
                        ):
                            raise RuntimeError(f"{response.status_code}: {response.text[:500]}")

                    async def post_one(index: int) -> None:
                        response = await client.post(
                            f"/v1/projects/{PROJECT}/labels",
                            data={"class_name": CLASSES[index % 10]},
                            files={"image": ("digit.png", images[index], "image/png")},
                            headers={"Authorization": f"Bearer {labeler}"},
                        )
                        if response.status_code != 201:
                            raise RuntimeError(f"{response.status_code}: {response.text}")

                    async def post(index: int) -> None:
                        if per_request == 1:
                            await post_one(index)
                        else:
                            await post_batch(index * per_request)

                    await run_clients(args.warmup // per_request, args.concurrency, post)
                    cpu = time.process_time()
                    offset = args.warmup // per_request
                    requests_per_s = await run_clients(
                        args.labels // per_request,
                        args.concurrency,
                        lambda i: post(offset + i),
                    )
                    labels_per_s = requests_per_s * per_request
                    cpu_ms = (time.process_time() - cpu) / args.labels * 1000
                    stats = await client.get(
                        f"/v1/projects/{PROJECT}/stats",
                        headers={"Authorization": f"Bearer {labeler}"},
                    )
                    snapshots = int(stats.json()["snapshots"])
            finally:
                topology = app.state.runtime.topology
                await delete_names(
                    rabbit,
                    queues=[],
                    exchanges=[
                        topology.events_exchange.name,
                        topology.inference_exchange.name,
                        topology.dead_letter_exchange.name,
                    ],
                )
            s3_puts_per_s = await asyncio.to_thread(raw_puts, s3, bucket, images, args)
    return Result(labels_per_s, s3_puts_per_s, snapshots, cpu_ms)


def raw_puts(s3: S3Server, bucket: str, images: list[bytes], args: argparse.Namespace) -> float:
    """The same images PUT straight to S3 by the minio SDK, ``concurrency`` at a time."""
    client = Minio(s3.endpoint, s3.access_key, s3.secret_key, secure=False, region="us-east-1")
    prefix = f"raw-{uuid.uuid4().hex[:8]}/"

    def put(index: int) -> None:
        data = images[index]
        client.put_object(
            bucket, f"{prefix}{index}", io.BytesIO(data), len(data), content_type="image/png"
        )

    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(put, range(args.warmup)))
        started = time.perf_counter()
        list(pool.map(put, range(args.warmup, args.warmup + args.labels)))
        return args.labels / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--labels", type=int, default=2000, help="labels posted and measured")
    parser.add_argument("--warmup", type=int, default=200, help="labels posted before measuring")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients")
    parser.add_argument("--transport", choices=["process", "asgi", "uvicorn"], default="process")
    parser.add_argument(
        "--workers", type=int, default=1, help="service processes (process transport)"
    )
    parser.add_argument(
        "--per-request",
        default="1,16",
        help="labels per request, one run each, comma-separated (>1: labels:batch)",
    )
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    for per_request in (int(n) for n in args.per_request.split(",")):
        run = argparse.Namespace(**{**vars(args), "per_request": per_request})
        result = asyncio.run(measure(run))
        print(
            f"{args.labels} labels, {per_request} per request, {args.transport} transport, "
            f"{result.snapshots} snapshots (warm-up included), "
            f"{result.cpu_ms_per_label:.2f} ms CPU per label in the load generator"
        )
        print(
            f"labels_per_s={result.labels_per_s:.1f} s3_puts_per_s={result.s3_puts_per_s:.1f} "
            f"ratio={result.labels_per_s / result.s3_puts_per_s:.3f}"
        )


if __name__ == "__main__":
    main()
