"""S3 stopped and started again: a ``TcpProxy`` in front of the real S3 server is the services'
``s3_endpoint``; stopping it closes the port and drops every connection (the server is gone),
starting it listens again on the same port (the server is back).

Labeling refuses labels with 503, ``Retry-After`` and a JSON error while S3 is away, quickly,
and never commits a label row whose image is not in S3; the refused labels are accepted once S3
returns. The log worker keeps the inference logs it was handed unacknowledged while it cannot
write them (and gives them back to the queue if it stops meanwhile), then writes every one of
them exactly once when S3 returns; nothing is dead-lettered.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from flywheel_contracts import InferenceLoggedV1
from flywheel_contracts.topology import dead_letter_queue_name, queue_name
from flywheel_inference_bff.logworker.layout import decode
from flywheel_inference_bff.logworker.main import create_app as create_log_worker
from flywheel_inference_bff.logworker.settings import SERVICE as LOG_WORKER
from flywheel_inference_bff.logworker.settings import LogWorkerSettings
from flywheel_labeling.main import create_app as create_labeling
from flywheel_labeling.settings import LabelingSettings
from flywheel_runtime.auth import AuthSettings
from flywheel_runtime.storage import ObjectStorage
from flywheel_testing.modules import load_file
from flywheel_testing.proxy import TcpProxy
from flywheel_testing.rabbit import queue_depth
from flywheel_testing.s3 import S3Server
from flywheel_testing.wait import wait_for
from flywheel_vision.data import to_png

e2e = load_file(Path(__file__).parents[1] / "e2e" / "conftest.py", "flywheel_e2e_support")
loop = e2e.loop

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

REFUSAL_BOUND_S = 15.0
"""Longest a label post may take to be refused while S3 is away: a refusal, never a hang."""

LABELERS = 8
"""Label posts in flight at once."""


async def _s3_proxy(loop: Any, s3_server: S3Server) -> TcpProxy:
    """A running proxy to ``s3_server``, stopped only after every service of the test."""
    host, port = s3_server.endpoint.rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    # Pushed before any service starts, so it is closed after all of them.
    loop.stack.push_async_callback(proxy.stop)
    loop.platform = loop.platform.model_copy(update={"s3_endpoint": f"127.0.0.1:{proxy.port}"})
    return proxy


# --- labeling -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Posted:
    """One label post and its answer."""

    index: int
    status: int | None
    """None when no answer came within ``REFUSAL_BOUND_S``."""
    seconds: float
    retry_after: str | None = None
    error_code: str | None = None
    label_id: str | None = None


def _images(n: int) -> list[bytes]:
    """``n`` distinct 28x28 PNGs (noise: no two share a content address)."""
    rng = np.random.default_rng(20260101)
    return [to_png(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(n)]


async def _post_all(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    pngs: list[bytes],
    indexes: Iterable[int],
    answered: list[Posted] | None = None,
) -> list[Posted]:
    """Post the labels of ``indexes``, ``LABELERS`` at a time; each answer also goes to
    ``answered`` as it comes."""
    gate = asyncio.Semaphore(LABELERS)
    answered = [] if answered is None else answered

    async def post(index: int) -> Posted:
        async with gate:
            started = time.perf_counter()
            try:
                response = await asyncio.wait_for(
                    client.post(
                        f"/v1/projects/{e2e.PROJECT}/labels",
                        headers=headers,
                        files={"image": (f"{index}.png", pngs[index], "image/png")},
                        data={"class_name": str(index % 10)},
                    ),
                    timeout=REFUSAL_BOUND_S,
                )
            except TimeoutError:
                answered.append(Posted(index, None, time.perf_counter() - started))
                return answered[-1]
            seconds = time.perf_counter() - started
        body = response.json()
        answered.append(
            Posted(
                index,
                response.status_code,
                seconds,
                retry_after=response.headers.get("Retry-After"),
                error_code=(body.get("error") or {}).get("code"),
                label_id=body.get("label_id"),
            )
        )
        return answered[-1]

    return list(await asyncio.gather(*(post(i) for i in indexes)))


async def _label_rows(app: FastAPI, schema: str) -> dict[str, str]:
    """label_id -> image_key of every label row in PostgreSQL."""
    async with app.state.runtime.database.engine.connect() as conn:
        rows = await conn.execute(
            text(f'SELECT label_id::text, image_key FROM "{schema}".labels')  # noqa: S608
        )
        return {row[0]: row[1] for row in rows}


async def _without_image(storage: ObjectStorage, bucket: str, rows: dict[str, str]) -> list[str]:
    """Label ids whose image is not in S3 (asked of S3 itself, not through the proxy)."""
    there = await asyncio.gather(*(storage.exists(bucket, key) for key in rows.values()))
    return [label_id for label_id, found in zip(rows, there, strict=True) if not found]


async def test_labels_posted_while_s3_is_down_get_503_and_no_row_lacks_its_image(
    loop: Any, s3_server: S3Server, storage: ObjectStorage
) -> None:
    up, in_flight, down = 24, 16, 32
    proxy = await _s3_proxy(loop, s3_server)
    schema = loop.schema("labeling")
    app = create_labeling(
        LabelingSettings(
            platform=loop.platform,
            auth=AuthSettings(dev_signing_key=loop.key),
            namespace=loop.topology.namespace,
            db_schema=schema,
            data_bucket=loop.bucket,
        )
    )
    client = await loop.start(app)
    await e2e.create_project(client, loop, count=10_000)
    headers = loop.bearer("labeler-1", "labeler")
    pngs = _images(up + in_flight + down + 1)

    before = await _post_all(client, headers, pngs, range(up))
    assert [p.status for p in before] == [201] * up, before

    # S3 goes away while labels are being posted: each of those is either saved or refused.
    answered: list[Posted] = []
    racing = asyncio.create_task(
        _post_all(client, headers, pngs, range(up, up + in_flight), answered)
    )

    async def first_answered() -> bool:
        return len(answered) >= 1

    await wait_for(first_answered, timeout=30, message="a racing post answered")
    cut_at = time.perf_counter()
    await proxy.stop()
    raced = await racing
    refused = await _post_all(client, headers, pngs, range(up + in_flight, up + in_flight + down))
    ready = await client.get("/readyz")
    rows_during = await _label_rows(app, schema)
    missing_during = await _without_image(storage, loop.bucket, rows_during)

    await proxy.start()
    down_s = time.perf_counter() - cut_at

    async def ready_again() -> bool:
        answer: httpx.Response = await client.get("/readyz")
        return answer.status_code == 200

    await wait_for(ready_again, timeout=30, message="labeling ready after S3 returned")
    to_repost = [p.index for p in raced + refused if p.status != 201]
    reposted = await _post_all(client, headers, pngs, to_repost)
    after = await _post_all(client, headers, pngs, [len(pngs) - 1])
    rows = await _label_rows(app, schema)
    missing = await _without_image(storage, loop.bucket, rows)
    images = await storage.list_keys(loop.bucket, "images/")

    statuses = Counter(str(p.status) for p in before + raced + refused + reposted + after)
    refusal_s = sorted(p.seconds for p in refused)
    accepted = {p.label_id for p in before + raced + reposted + after if p.status == 201}
    print(
        f"\ns3 outage labeling: statuses={dict(sorted(statuses.items()))} "
        f"raced={dict(Counter(str(p.status) for p in raced))} "
        f"refused_503={sum(p.status == 503 for p in refused)}/{down} "
        f"refusal_s min/median/max={refusal_s[0]:.2f}/{refusal_s[len(refusal_s) // 2]:.2f}/"
        f"{refusal_s[-1]:.2f} retry_after={sorted({p.retry_after for p in refused}, key=str)} "
        f"readyz_down={ready.status_code} {ready.json()['checks'].get('s3')} down_s={down_s:.1f} "
        f"rows_during={len(rows_during)} rows_without_image_during={len(missing_during)} "
        f"reposted_201={sum(p.status == 201 for p in reposted)}/{len(reposted)} "
        f"rows={len(rows)} images={len(images)} rows_without_image={len(missing)}"
    )

    assert all(p.status in (201, 503) for p in raced), raced
    for posted in refused:
        assert posted.status == 503, posted
        assert posted.seconds < REFUSAL_BOUND_S, posted
        assert posted.retry_after is not None, posted
        assert int(posted.retry_after) > 0, posted
        assert posted.error_code == "dependency_unavailable", posted
    assert ready.status_code == 503
    assert ready.json()["checks"]["s3"] != "ok"
    # Exactly the labels answered 201 have rows: a refused label left none behind.
    accepted_before = {p.label_id for p in before + raced if p.status == 201}
    assert set(rows_during) == accepted_before
    assert missing_during == []
    assert [p.status for p in reposted] == [201] * len(to_repost), reposted
    assert [p.status for p in after] == [201], after
    assert set(rows) == accepted
    assert len(rows) == up + in_flight + down + 1
    assert missing == []
    assert set(images) >= set(rows.values())


# --- log worker ---------------------------------------------------------------------------------

HOUR = datetime(2026, 1, 1, 10, tzinfo=UTC)


def _logs(n: int, model_line: str) -> list[InferenceLoggedV1]:
    return [
        InferenceLoggedV1.model_validate(
            {
                "payload": InferenceLoggedV1.EXAMPLE
                | {
                    "model_line": model_line,
                    "request_id": uuid.uuid4(),
                    "served_at": HOUR + timedelta(seconds=7 * i),
                }
            }
        )
        for i in range(n)
    ]


def _metric(app: FastAPI, name: str) -> float:
    registry = app.state.runtime.telemetry.registry
    return float(registry.get_sample_value(f"flywheel_logworker_{name}") or 0.0)


async def _stored_event_ids(storage: ObjectStorage, bucket: str) -> list[str]:
    """Event ids of every stored log file, repeats included (the reader would drop them)."""
    keys = await storage.list_keys(bucket, "inference/")
    blobs = await asyncio.gather(*(storage.get(bucket, key) for key in keys))
    return [i for blob in blobs for i in decode(blob).column("event_id").to_pylist()]


async def test_logs_delivered_while_s3_is_down_stay_unacked_and_are_written_once_it_returns(
    loop: Any, s3_server: S3Server, storage: ObjectStorage
) -> None:
    count, batch, prefetch = 250, 50, 100
    proxy = await _s3_proxy(loop, s3_server)
    queue = loop.topology.namespace + queue_name(LOG_WORKER, InferenceLoggedV1.routing_key())
    settings = LogWorkerSettings(
        platform=loop.platform,
        namespace=loop.topology.namespace,
        logs_bucket=loop.bucket,
        batch_size=batch,
        prefetch=prefetch,
        max_wait_s=0.2,
        retry_initial_s=0.05,
        retry_max_s=0.5,
        stop_timeout_s=1.0,
    )
    first = await loop.run(create_log_worker(settings))
    await proxy.stop()
    events = _logs(count, f"s3-outage-{loop.suffix}")
    await loop.publish(*events)

    async def failing(app: FastAPI, at_least: float) -> bool:
        return _metric(app, "write_failures_total") >= at_least

    async def holding(app: FastAPI) -> bool:
        return app.state.worker.pending == prefetch and await failing(app, 2)

    await wait_for(lambda: holding(first.app), timeout=30, message="first worker holding")
    # Still failing, still holding: nothing was acknowledged in between.
    seen = _metric(first.app, "write_failures_total")
    await wait_for(lambda: failing(first.app, seen + 2), timeout=30, message="still failing")
    held_first = first.app.state.worker.pending
    ready_while_held = await queue_depth(loop.rabbit_url, queue)
    written_while_down = _metric(first.app, "rows_written_total")
    stored_while_down = await _stored_event_ids(storage, loop.bucket)

    # A worker stopping while S3 is away gives what it held back to the queue.
    await first.stop()

    async def depth(n: int) -> bool:
        return await queue_depth(loop.rabbit_url, queue) == n

    await wait_for(lambda: depth(count), timeout=30, message=f"all {count} back in the queue")
    ready_after_stop = await queue_depth(loop.rabbit_url, queue)

    second = await loop.run(create_log_worker(settings))
    await wait_for(lambda: holding(second.app), timeout=30, message="second worker holding")
    failures = _metric(first.app, "write_failures_total") + _metric(
        second.app, "write_failures_total"
    )
    await proxy.start()
    back = time.perf_counter()

    async def all_stored() -> list[str] | None:
        stored = await _stored_event_ids(storage, loop.bucket)
        return stored if len(stored) >= count else None

    stored = await wait_for(all_stored, timeout=60, message=f"{count} logs in S3")
    write_s = time.perf_counter() - back
    await wait_for(lambda: depth(0), timeout=30, message="queue empty")

    async def settled() -> bool:
        return int(second.app.state.worker.pending) == 0

    await wait_for(settled, timeout=30, message="second worker acknowledged everything")
    stored = await _stored_event_ids(storage, loop.bucket)
    dead = await queue_depth(loop.rabbit_url, dead_letter_queue_name(queue))
    duplicates = len(stored) - len(set(stored))
    print(
        f"\ns3 outage log worker: logs={count} held_unacked={held_first} "
        f"ready_while_held={ready_while_held} write_failures={failures:.0f} "
        f"ready_after_stop={ready_after_stop} rows_written_while_down={written_while_down:.0f} "
        f"write_s_after_return={write_s:.1f} stored={len(stored)} unique={len(set(stored))} "
        f"duplicates={duplicates} rows_written={_metric(second.app, 'rows_written_total'):.0f} "
        f"dlq={dead}"
    )

    assert held_first == prefetch
    assert ready_while_held == count - prefetch
    assert written_while_down == 0
    assert stored_while_down == []
    assert ready_after_stop == count
    assert sorted(stored) == sorted(str(e.event_id) for e in events)
    assert duplicates == 0
    assert _metric(second.app, "rows_written_total") == count
    assert dead == 0
