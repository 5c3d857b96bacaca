"""labeling → labels.saved → data-monitor → exactly one threshold.reached, on the real servers."""

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr
from sqlalchemy import text

from flywheel_contracts import LabelsSavedV1, ThresholdReachedV1
from flywheel_data_monitor.main import create_app as create_data_monitor
from flywheel_data_monitor.settings import DataMonitorSettings
from flywheel_labeling.main import create_app as create_labeling
from flywheel_labeling.settings import LabelingSettings
from flywheel_runtime.auth import AuthSettings, generate_dev_key, issue_dev_token
from flywheel_runtime.datasets import SnapshotStore
from flywheel_runtime.settings import PlatformSettings
from flywheel_runtime.storage import ObjectStorage
from flywheel_runtime.topology import Topology
from flywheel_testing.events import EventProbe
from flywheel_testing.s3 import S3Server
from flywheel_testing.wait import wait_for
from flywheel_vision.data import load_mnist, to_png

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LABELS = 1000
CLIENTS = 32


async def _running(stack: AsyncExitStack, app: FastAPI) -> httpx.AsyncClient:
    await stack.enter_async_context(app.router.lifespan_context(app))
    transport = httpx.ASGITransport(app=app)
    return await stack.enter_async_context(
        httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60)
    )


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as exits:
        yield exits


async def test_a_thousand_labels_from_32_clients_fire_one_retrain_with_two_monitors(
    rabbit_url: str,
    database_url: str,
    s3_server: S3Server,
    topology: Topology,
    unique_bucket: str,
    storage: ObjectStorage,
    stack: AsyncExitStack,
) -> None:
    platform = PlatformSettings(
        rabbit_url=SecretStr(rabbit_url),
        database_url=SecretStr(database_url),
        s3_endpoint=s3_server.endpoint,
        s3_access_key=SecretStr(s3_server.access_key),
        s3_secret_key=SecretStr(s3_server.secret_key),
        log_json=False,
    )
    key = generate_dev_key("EC")
    suffix = uuid.uuid4().hex[:8]
    labeling = create_labeling(
        LabelingSettings(
            platform=platform,
            auth=AuthSettings(dev_signing_key=SecretStr(key)),
            namespace=topology.namespace,
            db_schema=f"labeling_{suffix}",
            data_bucket=unique_bucket,
        )
    )
    monitors = [
        create_data_monitor(
            DataMonitorSettings(
                platform=platform,
                namespace=topology.namespace,
                db_schema=f"data_monitor_{suffix}",
                data_bucket=unique_bucket,
                tick_interval_s=0.2,
            )
        )
        for _ in range(2)
    ]
    probe = await stack.enter_async_context(
        EventProbe(rabbit_url, topology, LabelsSavedV1, ThresholdReachedV1)
    )
    # Monitors first: their queues must exist before labeling announces anything.
    for monitor in monitors:
        await _running(stack, monitor)
    client = await _running(stack, labeling)
    admin = {"Authorization": f"Bearer {issue_dev_token(key, subject='ada', roles=['admin'])}"}

    created = await client.post(
        "/v1/projects",
        headers=admin,
        json={
            "project_id": "digits",
            "name": "Digits",
            "class_names": [str(d) for d in range(10)],
            "policy": {"count": LABELS},
        },
    )
    assert created.status_code == 201, created.text

    images, classes = load_mnist("train", limit=LABELS)
    pngs = [to_png(image) for image in images]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(LABELS):
        queue.put_nowait(index)

    async def labeler(n: int) -> list[str]:
        token = issue_dev_token(key, subject=f"labeler-{n}", roles=["labeler"])
        headers = {"Authorization": f"Bearer {token}"}
        label_ids = []
        while not queue.empty():
            index = queue.get_nowait()
            response = await client.post(
                "/v1/projects/digits/labels",
                headers=headers,
                files={"image": (f"{index}.png", pngs[index], "image/png")},
                data={"class_name": str(classes[index])},
            )
            assert response.status_code == 201, response.text
            label_ids.append(response.json()["label_id"])
        return label_ids

    accepted = [i for ids in await asyncio.gather(*map(labeler, range(CLIENTS))) for i in ids]
    assert len(set(accepted)) == LABELS

    [fired] = await probe.wait(ThresholdReachedV1, timeout=60)

    announced = {str(i) for e in probe.of(LabelsSavedV1) for i in e.payload.label_ids}
    assert announced == set(accepted)
    assert fired.payload.project_id == "digits"
    assert fired.payload.labels_since_last == LABELS
    assert fired.payload.threshold == LABELS
    assert fired.payload.reason == "count"
    snapshot = await SnapshotStore(storage, bucket=unique_bucket).resolve(
        "digits", fired.payload.snapshot_id
    )
    assert {str(e.label_id) for e in snapshot.entries} == set(accepted)
    assert all(
        await asyncio.gather(
            *(storage.exists(unique_bucket, e.image_key) for e in snapshot.entries)
        )
    )

    runtime = monitors[0].state.runtime
    engine = runtime.db.engine

    async def settled() -> bool:
        async with engine.connect() as conn:
            pending = await conn.execute(
                text("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            )
            handled = {
                row[0]
                for row in await conn.execute(text("SELECT event_id FROM processed_messages"))
            }
            saved = {e.event_id for e in probe.of(LabelsSavedV1)}
            return pending.scalar_one() == 0 and saved <= handled

    await wait_for(settled, timeout=30, message="every labels.saved handled, outbox drained")
    await probe.collect()
    assert len(probe.of(ThresholdReachedV1)) == 1
