"""Label ingest throughput against raw S3 PUTs of the same images.

Starts (or, through ``FLYWHEEL_TEST_*``, uses) PostgreSQL, RabbitMQ and S3, runs the labeling
app in this process and posts N distinct MNIST-sized PNGs as single multipart labels from 32
concurrent clients. In the same run it PUTs the same images straight to S3 with the minio SDK
at the same concurrency. Every label costs at least one S3 PUT (its image), so the ratio says
how much of the storage's speed the service keeps; the group commit is what keeps the snapshot
segment PUT and the transaction from being paid once per label.

    .venv/bin/python benchmarks/ingest.py --labels 2000

``--transport asgi`` (default) calls the app through httpx's ASGI transport; ``uvicorn`` serves
it on a free port and posts over HTTP. The last line is ``labels_per_s=… s3_puts_per_s=…
ratio=…``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

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


@contextlib.asynccontextmanager
async def app_client(app: FastAPI, transport: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the running app: straight into ASGI, or over HTTP to uvicorn."""
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
                namespace=unique_namespace(),
                data_bucket=bucket,
            )
            app = create_app(settings)
            admin = issue_dev_token(key, subject="admin", roles=["admin"])
            labeler = issue_dev_token(key, subject="bench", username="bench", roles=["labeler"])
            try:
                async with app_client(app, args.transport) as client:
                    created = await client.post(
                        "/v1/projects",
                        json={"project_id": PROJECT, "name": "bench", "class_names": CLASSES},
                        headers={"Authorization": f"Bearer {admin}"},
                    )
                    created.raise_for_status()

                    async def post(index: int) -> None:
                        response = await client.post(
                            f"/v1/projects/{PROJECT}/labels",
                            data={"class_name": CLASSES[index % 10]},
                            files={"image": ("digit.png", images[index], "image/png")},
                            headers={"Authorization": f"Bearer {labeler}"},
                        )
                        if response.status_code != 201:
                            raise RuntimeError(f"{response.status_code}: {response.text}")

                    await run_clients(args.warmup, args.concurrency, post)
                    cpu = time.process_time()
                    labels_per_s = await run_clients(
                        args.labels, args.concurrency, lambda i: post(args.warmup + i)
                    )
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
    parser.add_argument("--transport", choices=["asgi", "uvicorn"], default="asgi")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    result = asyncio.run(measure(args))
    print(
        f"{args.labels} labels in {result.snapshots} snapshots (warm-up included), "
        f"{result.cpu_ms_per_label:.2f} ms CPU per label in this process"
    )
    print(
        f"labels_per_s={result.labels_per_s:.1f} s3_puts_per_s={result.s3_puts_per_s:.1f} "
        f"ratio={result.labels_per_s / result.s3_puts_per_s:.3f}"
    )


if __name__ == "__main__":
    main()
