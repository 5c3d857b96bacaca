"""Rollback latency: from the end of a canary's first failing interval to 0 % canary traffic.

Starts (or, through ``FLYWHEEL_TEST_*``, uses) PostgreSQL, RabbitMQ, S3 and MLflow, and starts a
Triton of its own whose Python backend makes chosen versions slow (``FLYWHEEL_SERVING_FAULTS``).
Rollout and the inference BFF run in this process; a labeling tool's worth of clients calls
``/predict`` without pause. Each run registers a new version (the champion's weights, served
``--delay-ms`` late), announces it validated, and measures from the nominal end of the canary's
first failing analysis interval (its start plus ``--interval-s``) to the moment the BFF stops
routing to it (its routing table no longer gives the candidate any share). The policy rolls back
at the first failed check, so the target is at most one interval plus one second.

    .venv/bin/python benchmarks/rollback.py --interval-s 1 --runs 3

Each run prints ``run=… rollback_s=… step_s=…`` (``step_s``: the same end to the ``rollout.step``
at 0 %, as stamped by rollout); the last line is the worst run:
``rollback_s=… interval_s=… ratio=…`` where ratio is rollback_s / interval_s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from mlflow import MlflowClient
from pydantic import SecretStr

from flywheel_clients.registry import LABELS_FILE, ONNX_FILE, ModelRegistry
from flywheel_contracts import CanaryVerdictV1, ModelValidatedV1, RolloutStepV1
from flywheel_inference_bff.main import create_app as create_bff
from flywheel_inference_bff.settings import BffSettings
from flywheel_rollout.main import create_app as create_rollout
from flywheel_rollout.policy import CanaryPolicy, Margins
from flywheel_rollout.settings import RolloutSettings
from flywheel_runtime.auth import AuthSettings, generate_dev_key, issue_dev_token
from flywheel_runtime.messaging import create_broker, publish_event
from flywheel_runtime.settings import PlatformSettings
from flywheel_runtime.topology import Topology
from flywheel_serving.repository import ServingOptions, sync_from_registry
from flywheel_serving.triton import TritonControl, TritonServer
from flywheel_testing.events import EventProbe
from flywheel_testing.mlflow_server import mlflow_for_tests
from flywheel_testing.postgres import postgres_server, sqlalchemy_url, throwaway_database
from flywheel_testing.rabbit import delete_names, rabbit_server, unique_namespace
from flywheel_testing.s3 import S3Server, s3_for_tests
from flywheel_testing.serving import digit_model_files
from flywheel_testing.wait import wait_for
from flywheel_vision.data import load_mnist, to_png
from flywheel_vision.export import labels_json

PROJECT = "bench-digits"
SERVING = ServingOptions(flavour="python", max_batch_size=8, preferred_batch_sizes=(8,))


@dataclass(frozen=True)
class Run:
    rollback_s: float
    step_s: float


@contextlib.contextmanager
def servers(workdir: Path) -> Iterator[tuple[str, str, S3Server, str]]:
    """RabbitMQ, PostgreSQL (admin URL), S3 and MLflow, as the test fixtures find or start them."""
    with (
        rabbit_server() as rabbit,
        postgres_server() as postgres,
        s3_for_tests(workdir / "s3") as s3,
        mlflow_for_tests(workdir / "mlflow", s3=s3, postgres_admin_url=postgres) as mlflow,
    ):
        yield rabbit, postgres, s3, mlflow.tracking_uri


def register(uri: str, model: str, workdir: Path) -> str:
    """A version of ``model``: an untrained ONNX digit classifier, logged as the trainer does."""
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if not client.search_registered_models(f"name = '{model}'"):
        client.create_registered_model(model)
    experiment = client.get_experiment_by_name(model)
    experiment_id = (
        experiment.experiment_id if experiment is not None else client.create_experiment(model)
    )
    run = client.create_run(experiment_id)
    files = digit_model_files(model, "0", seed=1)
    folder = workdir / f"artifacts-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    (folder / ONNX_FILE).write_bytes(files.onnx)
    (folder / LABELS_FILE).write_bytes(labels_json(files.labels))
    client.log_artifacts(run.info.run_id, str(folder), artifact_path="model")
    client.set_terminated(run.info.run_id)
    version = client.create_model_version(model, f"{run.info.artifact_uri}/model", run.info.run_id)
    return str(version.version)


@contextlib.asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bench", timeout=60
        ) as client,
    ):
        yield client


async def traffic(client: httpx.AsyncClient, model: str, token: str, stop: asyncio.Event) -> None:
    """One labeling-tool client: ``/predict`` on a repeating pool of MNIST test digits."""
    pixels, _ = load_mnist("test", limit=40)
    images = [to_png(p) for p in pixels]
    index = 0
    while not stop.is_set():
        index = (index + 1) % len(images)
        response = await client.post(
            "/predict",
            files={"image": ("digit.png", images[index], "image/png")},
            data={"model_line": model},
            headers={"Authorization": f"Bearer {token}"},
        )
        if response.status_code != 200:
            await asyncio.sleep(0.05)  # a version loading; the next call retries


async def measure(args: argparse.Namespace) -> list[Run]:
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        with servers(workdir) as (rabbit, postgres, s3, mlflow_uri):
            async with throwaway_database(postgres) as dsn:
                return await measure_on(args, workdir, rabbit, sqlalchemy_url(dsn), s3, mlflow_uri)


async def measure_on(
    args: argparse.Namespace,
    workdir: Path,
    rabbit: str,
    database_url: str,
    s3: S3Server,
    mlflow_uri: str,
) -> list[Run]:
    model = f"bench-{uuid.uuid4().hex[:8]}"
    champion = await asyncio.to_thread(register, mlflow_uri, model, workdir)
    candidates = [
        await asyncio.to_thread(register, mlflow_uri, model, workdir) for _ in range(args.runs)
    ]
    faults = workdir / "faults.json"
    faults.write_text(json.dumps({f"{model}:{v}": {"delay_ms": args.delay_ms} for v in candidates}))
    repository = workdir / "repository"
    repository.mkdir()
    triton = await asyncio.to_thread(
        TritonServer.start,
        repository,
        log_path=workdir / "tritonserver.log",
        env={"FLYWHEEL_SERVING_FAULTS": str(faults)},
    )
    topology = Topology(namespace=unique_namespace(), delivery_limit=3)
    key = generate_dev_key("EC")
    platform = PlatformSettings(
        rabbit_url=SecretStr(rabbit),
        database_url=SecretStr(database_url),
        s3_endpoint=s3.endpoint,
        s3_access_key=SecretStr(s3.access_key),
        s3_secret_key=SecretStr(s3.secret_key),
        mlflow_uri=mlflow_uri,
        triton_url=triton.http_url,
        delivery_limit=topology.delivery_limit,
        log_level="WARNING",
    )
    policy = CanaryPolicy(
        steps=[10, 50],
        interval_s=args.interval_s,
        bake_s=args.interval_s,
        min_requests=3,
        min_pairs=3,
        threshold=1,
        margins=Margins(latency_p95=1.0, latency_p99=2.0, latency_slack_ms=100.0),
    )
    rollout_app = create_rollout(
        RolloutSettings(
            platform=platform,
            namespace=topology.namespace,
            db_schema=f"rollout_{uuid.uuid4().hex[:8]}",
            default_policy=policy,
            repository_dir=repository,
            serving=SERVING,
            tick_s=args.tick_s,
            drain_s=0.5,
            republish_s=3600,
        )
    )
    bff_app = create_bff(
        BffSettings(
            platform=platform,
            namespace=topology.namespace,
            db_schema=f"bff_{uuid.uuid4().hex[:8]}",
            default_model_line=model,
            project_ids={model: PROJECT},
            auth=AuthSettings(dev_signing_key=SecretStr(key)),
            inference_timeout_s=30,
        )
    )
    token = issue_dev_token(key, subject="bench", roles=["predict"], expires_in=3600)
    stop = asyncio.Event()
    try:
        async with AsyncExitStack() as stack:
            MlflowClient(mlflow_uri, mlflow_uri).set_registered_model_alias(
                model, "champion", champion
            )
            await sync_from_registry(
                ModelRegistry(mlflow_uri), model, repository, SERVING, versions=[champion]
            )
            async with TritonControl(triton.http_url) as control:
                await control.load(model)
                await control.wait_model_ready(model, champion, timeout=120)
            probe = await stack.enter_async_context(
                EventProbe(rabbit, topology, RolloutStepV1, CanaryVerdictV1)
            )
            rollout = await stack.enter_async_context(running(rollout_app))
            bff = await stack.enter_async_context(running(bff_app))
            publisher = create_broker(rabbit, app_id="bench")
            await publisher.connect()
            stack.push_async_callback(publisher.stop)
            clients = [
                asyncio.create_task(traffic(bff, model, token, stop))
                for _ in range(args.concurrency)
            ]
            routing = bff_app.state.predictor.routing
            runs = []
            for number, candidate in enumerate(candidates, start=1):
                runs.append(
                    await one_run(
                        number,
                        candidate,
                        champion,
                        model,
                        publisher,
                        topology,
                        probe,
                        rollout,
                        routing,
                    )
                )
            stop.set()
            await asyncio.gather(*clients)
            queues = {
                q for app in (rollout_app, bff_app) for q in app.state.runtime.topology.queue_names
            }
        await delete_names(rabbit, sorted(queues), [])
        return runs
    finally:
        stop.set()
        await asyncio.to_thread(triton.stop)


async def one_run(
    number: int,
    candidate: str,
    champion: str,
    model: str,
    publisher: Any,
    topology: Topology,
    probe: EventProbe,
    rollout: httpx.AsyncClient,
    routing: Any,
) -> Run:
    """One slow candidate's canary, from its validation to the BFF routing around it."""
    event = ModelValidatedV1.model_validate(
        {
            "payload": {
                "project_id": PROJECT,
                "model_line": model,
                "registered_model": model,
                "model_version": candidate,
                "champion_version": champion,
                "snapshot_id": "bench",
                "verdict": "passed",
            }
        }
    )
    await publish_event(publisher, topology, event)

    async def started() -> uuid.UUID | None:
        route = routing.route(model)
        if route is not None and route.candidate_version == candidate and route.candidate_percent:
            return route.rollout_id  # type: ignore[no-any-return]
        return None

    async def unrouted() -> datetime | None:
        route = routing.route(model)
        if route is not None and route.rollout_id == rollout_id and not route.candidate_percent:
            return datetime.now(UTC)
        return None

    rollout_id = await wait_for(
        started, timeout=300, interval=0.005, message=f"version {candidate} routed"
    )
    flipped = await wait_for(
        unrouted, timeout=300, interval=0.005, message=f"version {candidate} no longer routed"
    )
    checks = (await rollout.get(f"/api/v1/canaries/{rollout_id}/checks")).json()["checks"]
    failing = next(c for c in checks if c["status"] == "failed")
    policy_interval = (await rollout.get(f"/api/v1/canaries/{rollout_id}")).json()["policy"][
        "interval_s"
    ]
    end = datetime.fromisoformat(failing["started_at"]) + timedelta(seconds=policy_interval)
    [step] = [
        e
        for e in await _steps(probe)
        if e.payload.rollout_id == rollout_id and e.payload.traffic_percent == 0
    ]
    await probe.wait(CanaryVerdictV1, n=number, timeout=60)
    run = Run(
        rollback_s=(flipped - end).total_seconds(),
        step_s=(step.occurred_at - end).total_seconds(),
    )
    print(f"run={number} rollback_s={run.rollback_s:.3f} step_s={run.step_s:.3f}", flush=True)
    return run


async def _steps(probe: EventProbe) -> list[RolloutStepV1]:
    await probe.collect()
    return probe.of(RolloutStepV1)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--interval-s", type=float, default=1.0, help="analysis interval")
    parser.add_argument(
        "--runs", type=int, default=3, help="canaries rolled back, one after another"
    )
    parser.add_argument("--delay-ms", type=int, default=600, help="how slow the candidates are")
    parser.add_argument("--tick-s", type=float, default=0.2, help="rollout's tick")
    parser.add_argument("--concurrency", type=int, default=4, help="clients calling /predict")
    args = parser.parse_args()
    started = time.perf_counter()
    runs = asyncio.run(measure(args))
    worst = max(r.rollback_s for r in runs)
    mean = sum(r.rollback_s for r in runs) / len(runs)
    print(f"mean_rollback_s={mean:.3f} runs={len(runs)} wall_s={time.perf_counter() - started:.0f}")
    print(
        f"rollback_s={worst:.3f} interval_s={args.interval_s:g} ratio={worst / args.interval_s:.3f}"
    )


if __name__ == "__main__":
    main()
