"""Inline batch throughput: the BFF's ``/predict/batch`` against onnxruntime in this process.

Starts the same stack as ``serving.py`` (S3, MLflow on PostgreSQL, RabbitMQ as the tests find
it, a real ``tritonserver`` serving one registered DigitNet version through the Python backend,
the log worker and the BFF as processes of their own, inference logging on) and posts inline
batches: ``--per-request`` base64 MNIST PNGs in one JSON request, ``--concurrency`` requests at
a time. The reference, measured in the same run and alternating round by round, is the same
images through onnxruntime in this process: ``preprocess`` of every PNG, then one
``session.run`` per batch of the same size, with as many onnxruntime threads as a Triton
instance gets. Figures are medians over rounds.

    .venv/bin/python benchmarks/batch.py --per-request 64 --concurrency 4

The last line is ``batch_ips=… raw_ips=… ratio=…`` (images per second).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from serving import (
    Services,
    Stack,
    digits,
    logs_dropped,
    reference_classes,
    run_load,
    services,
    serving_stack,
)

from flywheel_serving.repository import ServingOptions
from flywheel_vision.preprocess import INPUT_NAME, OUTPUT_NAME, preprocess


@dataclass
class Round:
    mode: str
    ips: float
    cpu_ms: dict[str, float] = field(default_factory=dict)
    """CPU per image of each measured process (group)."""


class BatchClient:
    """Posts prepared ``/predict/batch`` bodies, one per request, cycling through them."""

    def __init__(self, url: str, token: str, bodies: list[bytes], concurrency: int) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency),
            timeout=aiohttp.ClientTimeout(total=120),
        )
        self._url = f"{url}/predict/batch"
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._bodies = bodies

    async def predict(self, index: int) -> list[int]:
        body = self._bodies[index % len(self._bodies)]
        async with self._session.post(self._url, data=body, headers=self._headers) as response:
            answer = await response.read()
            if response.status != 200:
                raise RuntimeError(f"/predict/batch answered {response.status}: {answer[:300]!r}")
        parsed = json.loads(answer)
        if parsed["errors"]:
            raise RuntimeError(f"/predict/batch refused images: {answer[:300]!r}")
        return [int(item["prediction"]["predicted_class"]) for item in parsed["items"]]

    async def close(self) -> None:
        await self._session.close()


def batch_bodies(pngs: list[bytes], per_request: int) -> list[bytes]:
    """JSON bodies of ``per_request`` base64 images each, built once so the load generator
    spends its CPU sending, not encoding."""
    encoded = [base64.b64encode(png).decode() for png in pngs]
    return [
        json.dumps({"images": [{"image_b64": e} for e in encoded[i : i + per_request]]}).encode()
        for i in range(0, len(encoded) - per_request + 1, per_request)
    ]


def raw_onnxruntime(
    onnx: bytes, pngs: list[bytes], per_request: int, images: int, threads: int
) -> Round:
    """``images`` PNGs preprocessed and run through onnxruntime ``per_request`` at a time."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx, sess_options=options, providers=["CPUExecutionProvider"])
    batches = len(pngs) // per_request
    cpu = time.process_time()
    started = time.perf_counter()
    for number in range(images // per_request):
        first = (number % batches) * per_request
        batch = np.stack([preprocess(png) for png in pngs[first : first + per_request]])
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch})
        np.argmax(logits, axis=1)
    elapsed = time.perf_counter() - started
    done = images // per_request * per_request
    return Round("raw", done / elapsed, {"raw": (time.process_time() - cpu) / done * 1000})


async def measure(args: argparse.Namespace, stack: Stack) -> list[Round]:
    pngs, tensors = digits(args.images)
    bodies = batch_bodies(pngs, args.per_request)
    requests = args.batch_images // args.per_request
    rounds: list[Round] = []
    async with services(stack, {"bff": args.log == "on"}, workers=args.workers) as running:
        bff = running.bffs["bff"]

        async def post_batches(count: int, groups: dict[str, int]) -> Round:
            client = BatchClient(bff.url, running.token, bodies, args.concurrency)
            try:
                measured = await run_load(count, args.concurrency, client.predict, groups)
            finally:
                await client.close()
            ips = measured.rps * args.per_request
            cpu = {name: ms / args.per_request for name, ms in measured.group_cpu_ms.items()}
            return Round("batch", ips, cpu)

        await check_answers(running, bodies[0], stack, tensors[: args.per_request])
        groups = {
            "bff": bff.process.pid,
            "triton": stack.triton.pid,
            "log-worker": running.log_worker.process.pid,
        }
        await post_batches(max(1, args.warmup // args.per_request), {})
        raw_onnxruntime(stack.files.onnx, pngs, args.per_request, args.warmup, args.threads)
        for number in range(args.rounds):
            for mode in ("batch", "raw") if number % 2 == 0 else ("raw", "batch"):
                if mode == "batch":
                    measured = await post_batches(requests, groups)
                else:
                    measured = await asyncio.to_thread(
                        raw_onnxruntime,
                        stack.files.onnx,
                        pngs,
                        args.per_request,
                        args.batch_images,
                        args.threads,
                    )
                rounds.append(measured)
                spent = " ".join(f"{name}_cpu_ms={ms:.3f}" for name, ms in measured.cpu_ms.items())
                print(
                    f"round {number + 1} {mode:<5} ips={measured.ips:8.1f} "
                    f"{spent} (per image) load={os.getloadavg()[0]:.2f}",
                    flush=True,
                )
        async with aiohttp.ClientSession() as session:
            dropped = await logs_dropped(session, bff.url)
        print(f"inference logs dropped by the BFF: {dropped:.0f}", flush=True)
    return rounds


async def check_answers(
    running: Services, body: bytes, stack: Stack, tensors: list[npt.NDArray[np.float32]]
) -> None:
    """The BFF's classes for one batch are onnxruntime's."""
    client = BatchClient(running.bffs["bff"].url, running.token, [body], 1)
    try:
        answered = await client.predict(0)
    finally:
        await client.close()
    expected = reference_classes(stack.files.onnx, tensors)
    if answered != expected:
        raise RuntimeError(f"/predict/batch answered {answered}, onnxruntime {expected}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--per-request", type=int, default=64, help="images per request")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent requests")
    parser.add_argument("--batch-images", type=int, default=8192, help="images per round")
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds per side")
    parser.add_argument("--warmup", type=int, default=1024, help="images per side first")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of the BFF")
    parser.add_argument(
        "--log", choices=["on", "off"], default="on", help="the BFF's inference logging"
    )
    parser.add_argument("--instances", type=int, default=1, help="Triton model instances")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads/instance")
    parser.add_argument("--images", type=int, default=1024, help="distinct MNIST test digits")
    args = parser.parse_args()
    if args.images < args.per_request:
        parser.error("--images must be at least --per-request")

    options = ServingOptions(
        flavour="python", instance_count=args.instances, intra_op_threads=args.threads
    )
    load_before = os.getloadavg()
    with (
        tempfile.TemporaryDirectory(prefix="flywheel-bench-batch-") as tmp,
        serving_stack(Path(tmp), options) as stack,
    ):
        print(
            f"batch: {args.batch_images} images x {args.rounds} rounds per side, "
            f"{args.per_request} images per request, {args.concurrency} concurrent, BFF uvicorn "
            f"workers {args.workers} (inference logging {args.log}, log worker as its own "
            f"process), "
            f"Triton instances {args.instances} (python backend, onnxruntime threads "
            f"{args.threads}); reference: onnxruntime in this process, {args.threads} "
            f"thread(s), batches of {args.per_request}; {os.cpu_count()} CPUs, "
            f"load before {load_before[0]:.2f}",
            flush=True,
        )
        rounds = asyncio.run(measure(args, stack))
    batch = statistics.median(r.ips for r in rounds if r.mode == "batch")
    raw = statistics.median(r.ips for r in rounds if r.mode == "raw")
    cpu = {
        name: statistics.median(r.cpu_ms[name] for r in rounds if r.mode == "batch")
        for name in ("bff", "triton", "log-worker")
    }
    raw_cpu = statistics.median(r.cpu_ms["raw"] for r in rounds if r.mode == "raw")
    print(
        "median CPU ms per image: "
        + ", ".join(f"{name} {ms:.3f}" for name, ms in cpu.items())
        + f"; raw {raw_cpu:.3f}; load after {os.getloadavg()[0]:.2f}"
    )
    print(f"batch_ips={batch:.1f} raw_ips={raw:.1f} ratio={batch / raw:.3f}")


if __name__ == "__main__":
    main()
