"""32 labelers posting 10 000 labels while a labeling tool asks ``/predict`` at the serving
benchmark's concurrency, all on this machine's cores: not one 5xx, not one label lost.

``FLYWHEEL_LOAD_LABELS`` sets the label count (10 000 by default; CI may run fewer).
"""

import asyncio
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from flywheel_contracts import LabelsSavedV1
from flywheel_data_monitor.main import create_app as create_data_monitor
from flywheel_data_monitor.settings import DataMonitorSettings
from flywheel_runtime.storage import ObjectStorage
from flywheel_serving.triton import TritonServer
from flywheel_testing.events import EventProbe
from flywheel_testing.wait import wait_for
from flywheel_vision.data import load_mnist, to_png

from .conftest import e2e

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

LABELS = int(os.environ.get("FLYWHEEL_LOAD_LABELS", "10000"))
LABELERS = 32
PREDICTORS = 32
"""The serving benchmark's concurrency."""


@dataclass
class Endpoint:
    """Status codes and latencies of one endpoint under load."""

    statuses: Counter[int] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)

    async def call(self, request: Any) -> httpx.Response:
        started = time.perf_counter()
        response: httpx.Response = await request
        self.latencies_ms.append((time.perf_counter() - started) * 1000)
        self.statuses[response.status_code] += 1
        return response

    def figures(self, name: str) -> str:
        ordered = sorted(self.latencies_ms)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return (
            f"{name} requests={len(ordered)} p50_ms={statistics.median(ordered):.1f} "
            f"p99_ms={p99:.1f} statuses={dict(sorted(self.statuses.items()))}"
        )


async def test_labels_and_predictions_at_once_lose_nothing_and_never_answer_5xx(
    loop: Any, mlflow_tracking_uri: str, triton_server: TritonServer, storage: ObjectStorage
) -> None:
    loop.with_mlflow(mlflow_tracking_uri)
    loop.stack.push_async_callback(loop.unserve, triton_server)
    champion = loop.register(seed=1)
    loop.mlflow().set_registered_model_alias(loop.model_line, "champion", champion)
    await loop.serve(triton_server, champion)
    probe = await loop.stack.enter_async_context(
        EventProbe(loop.rabbit_url, loop.topology, LabelsSavedV1)
    )
    await loop.start(
        create_data_monitor(
            DataMonitorSettings(
                platform=loop.platform,
                namespace=loop.topology.namespace,
                db_schema=loop.schema("data-monitor"),
                data_bucket=loop.bucket,
            )
        )
    )
    labeling = await loop.start_labeling()
    bff = await loop.start_bff(triton_server)
    # A threshold above the load: this test is about intake, not retraining.
    await e2e.create_project(labeling, loop, count=LABELS + 1)
    images, classes = load_mnist("train", limit=LABELS)
    pngs = [to_png(image) for image in images]
    pool = [to_png(image) for image in load_mnist("test", limit=64)[0]]
    labels, predict = Endpoint(), Endpoint()
    accepted: list[str] = []
    work: asyncio.Queue[int] = asyncio.Queue()
    for index in range(LABELS):
        work.put_nowait(index)
    done = asyncio.Event()

    async def labeler(n: int) -> None:
        headers = loop.bearer(f"labeler-{n}", "labeler")
        while not work.empty():
            index = work.get_nowait()
            response = await labels.call(
                labeling.post(
                    f"/v1/projects/{e2e.PROJECT}/labels",
                    headers=headers,
                    files={"image": (f"{index}.png", pngs[index], "image/png")},
                    data={"class_name": str(classes[index])},
                )
            )
            if response.status_code == 201:
                accepted.append(response.json()["label_id"])

    async def predictor(n: int) -> None:
        headers = loop.bearer(f"tool-{n}", "predict")
        sent = n
        while not done.is_set():
            sent += PREDICTORS
            await predict.call(
                bff.client.post(
                    "/predict",
                    files={"image": ("digit.png", pool[sent % len(pool)], "image/png")},
                    data={"model_line": loop.model_line},
                    headers=headers,
                )
            )

    started = time.perf_counter()
    predictors = [asyncio.create_task(predictor(n)) for n in range(PREDICTORS)]
    await asyncio.gather(*(labeler(n) for n in range(LABELERS)))
    done.set()
    await asyncio.gather(*predictors)
    wall = time.perf_counter() - started

    async def all_announced() -> bool:
        await probe.collect()
        announced = {str(i) for e in probe.of(LabelsSavedV1) for i in e.payload.label_ids}
        return announced >= set(accepted)

    await wait_for(all_announced, timeout=120, message="every accepted label in a labels.saved")
    engine = loop.apps[0].state.runtime.db.engine
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(f'SELECT label_id::text, image_key FROM "{loop.schema("labeling")}".labels')  # noqa: S608
        )
        stored = {row[0]: row[1] for row in rows}
    images_there = await asyncio.gather(
        *(storage.exists(loop.bucket, stored[i]) for i in accepted if i in stored)
    )
    print(
        f"\nload labels={LABELS} labelers={LABELERS} predictors={PREDICTORS} wall_s={wall:.1f}\n"
        f"{labels.figures('POST /v1/projects/{id}/labels')}\n"
        f"{predict.figures('POST /predict')}"
    )

    assert not [s for s in labels.statuses if s >= 500], labels.statuses
    assert not [s for s in predict.statuses if s >= 500], predict.statuses
    assert labels.statuses[201] == LABELS, labels.statuses
    assert len(set(accepted)) == LABELS
    assert set(accepted) <= set(stored), "an accepted label is missing from PostgreSQL"
    assert all(images_there), "an accepted label's image is missing from S3"
    assert predict.statuses[200] > 0
