"""The log worker's app factory: runtime, storage, writer, batching loop, queue consumer.

The HTTP side only serves ``/healthz``, ``/readyz`` and ``/metrics``; the work is the batching
loop, started and stopped with the app's lifespan so that uvicorn's SIGTERM handling ends in
one last write of the pending batch.
"""

from __future__ import annotations

from fastapi import FastAPI

from flywheel_contracts import InferenceLoggedV1
from flywheel_inference_bff.logworker.settings import SERVICE, LogWorkerSettings
from flywheel_inference_bff.logworker.worker import LogWorker, QueueConsumer, WorkerMetrics
from flywheel_inference_bff.logworker.writer import ParquetBatchWriter
from flywheel_runtime.app import ServiceRuntime, fastapi_app
from flywheel_runtime.storage import ObjectStorage

TITLE = "Flywheel inference log worker"
VERSION = "0.1.0"


def create_app(settings: LogWorkerSettings | None = None) -> FastAPI:
    """Build the worker; nothing connects until the app's lifespan starts."""
    settings = settings or LogWorkerSettings()
    runtime = ServiceRuntime.create(SERVICE, settings.platform, namespace=settings.namespace)
    storage = ObjectStorage.from_settings(settings.platform)
    consumer = QueueConsumer(
        runtime.broker,
        runtime.topology,
        # Built before the runtime starts, so its dead-letter queue is declared with the rest.
        runtime.topology.queue(SERVICE, InferenceLoggedV1),
        prefetch=settings.prefetch_count,
    )
    worker = LogWorker(
        ParquetBatchWriter(storage, settings.logs_bucket),
        WorkerMetrics.create(runtime.telemetry.registry),
        batch_size=settings.batch_size,
        max_wait_s=settings.max_wait_s,
        retry_initial_s=settings.retry_initial_s,
        retry_max_s=settings.retry_max_s,
        max_message_bytes=settings.platform.max_message_bytes,
        dead_letter=consumer.dead_letter,
    )

    async def start() -> None:
        worker.start()
        await consumer.start(worker.deliver)

    async def stop() -> None:
        await consumer.cancel()
        await worker.stop(settings.stop_timeout_s)
        await consumer.close()
        storage.close()

    runtime.on_start.append(start)
    runtime.on_stop.append(stop)
    runtime.checks["s3"] = storage.ping
    runtime.checks["worker"] = worker.check

    app = fastapi_app(runtime, title=TITLE, version=VERSION)
    app.state.worker = worker
    return app
