"""labeling → labels.saved → data-monitor → exactly one threshold.reached, on the real servers."""

import asyncio

import pytest
from sqlalchemy import text

from flywheel_contracts import LabelsSavedV1, ThresholdReachedV1
from flywheel_data_monitor.main import create_app as create_data_monitor
from flywheel_data_monitor.settings import DataMonitorSettings
from flywheel_labeling.main import create_app as create_labeling
from flywheel_labeling.settings import LabelingSettings
from flywheel_runtime.auth import AuthSettings
from flywheel_runtime.datasets import SnapshotStore
from flywheel_runtime.storage import ObjectStorage
from flywheel_testing.events import EventProbe
from flywheel_testing.wait import wait_for

from .conftest import Loop, create_project, post_mnist

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LABELS = 1000


async def test_a_thousand_labels_from_32_clients_fire_one_retrain_with_two_monitors(
    loop: Loop, storage: ObjectStorage
) -> None:
    probe = await loop.stack.enter_async_context(
        EventProbe(loop.rabbit_url, loop.topology, LabelsSavedV1, ThresholdReachedV1)
    )
    monitors = [
        create_data_monitor(
            DataMonitorSettings(
                platform=loop.platform,
                namespace=loop.topology.namespace,
                db_schema=loop.schema("data-monitor"),
                data_bucket=loop.bucket,
                tick_interval_s=0.2,
            )
        )
        for _ in range(2)
    ]
    # Monitors first: their queues must exist before labeling announces anything.
    for monitor in monitors:
        await loop.start(monitor)
    client = await loop.start(
        create_labeling(
            LabelingSettings(
                platform=loop.platform,
                auth=AuthSettings(dev_signing_key=loop.key),
                namespace=loop.topology.namespace,
                db_schema=loop.schema("labeling"),
                data_bucket=loop.bucket,
            )
        )
    )
    await create_project(client, loop, count=LABELS)

    accepted = await post_mnist(client, loop, LABELS)

    assert len(set(accepted)) == LABELS
    [fired] = await probe.wait(ThresholdReachedV1, timeout=60)
    announced = {str(i) for e in probe.of(LabelsSavedV1) for i in e.payload.label_ids}
    assert announced == set(accepted)
    assert fired.payload.project_id == "digits"
    assert fired.payload.labels_since_last == LABELS
    assert fired.payload.threshold == LABELS
    assert fired.payload.reason == "count"
    snapshot = await SnapshotStore(storage, bucket=loop.bucket).resolve(
        "digits", fired.payload.snapshot_id
    )
    assert {str(e.label_id) for e in snapshot.entries} == set(accepted)
    stored = await asyncio.gather(
        *(storage.exists(loop.bucket, e.image_key) for e in snapshot.entries)
    )
    assert all(stored)

    engine = monitors[0].state.runtime.db.engine

    async def settled() -> bool:
        async with engine.connect() as conn:
            pending = await conn.execute(
                text("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            )
            rows = await conn.execute(text("SELECT event_id FROM processed_messages"))
            handled = {row[0] for row in rows}
            saved = {e.event_id for e in probe.of(LabelsSavedV1)}
            return pending.scalar_one() == 0 and saved <= handled

    await wait_for(settled, timeout=30, message="every labels.saved handled, outbox drained")
    await probe.collect()
    assert len(probe.of(ThresholdReachedV1)) == 1
