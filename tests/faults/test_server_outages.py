"""RabbitMQ (``rabbitmqctl stop_app``) or PostgreSQL (``pg_ctlcluster … stop``) stopped and started
again while 32 labelers stream labels: every accepted label is in PostgreSQL, in S3 and in a
``labels.saved``; the threshold crossed fires exactly one retrain; no good event lands in a
dead-letter queue; the services carry on without a restart. While PostgreSQL is away labeling
answers 503 with ``Retry-After`` (the labelers come back when it says); while RabbitMQ is away
it keeps accepting labels (the outbox holds their announcement).

``FLYWHEEL_FAULT_LABELS`` sets the label count (2 000 by default; the issue's figure is 10 000).
These stop the machine's servers for everyone: they run only where the server is this
machine's and its control command is here.
"""

import asyncio
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import httpx
import pytest
from sqlalchemy import text

from flywheel_contracts import (
    CanaryOutcome,
    CanaryVerdictV1,
    LabelsSavedV1,
    RolloutStepV1,
    ThresholdReachedV1,
)
from flywheel_contracts.topology import DLQ_SUFFIX
from flywheel_data_monitor.main import create_app as create_data_monitor
from flywheel_data_monitor.settings import DataMonitorSettings
from flywheel_runtime.storage import ObjectStorage
from flywheel_testing.events import EventProbe
from flywheel_testing.modules import load_file
from flywheel_testing.wait import wait_for
from flywheel_vision.data import load_mnist, to_png

e2e = load_file(Path(__file__).parents[1] / "e2e" / "conftest.py", "flywheel_e2e_support")
loop = e2e.loop

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

LABELS = int(os.environ.get("FLYWHEEL_FAULT_LABELS", "2000"))
LABELERS = 32


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=120)


def _postgres_cluster() -> list[str]:
    versions = sorted(Path("/etc/postgresql").glob("*")) if Path("/etc/postgresql").is_dir() else []
    if not versions or shutil.which("pg_ctlcluster") is None:
        return []
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1].name, "main"]


@dataclass(frozen=True)
class Outage:
    """How to stop and start one server of this machine."""

    server: str
    stop: list[list[str]]
    start: list[list[str]]
    url_fixture: str


OUTAGES = {
    "rabbitmq": Outage(
        "rabbitmq",
        stop=[["rabbitmqctl", "-q", "stop_app"]],
        start=[["rabbitmqctl", "-q", "start_app"], ["rabbitmqctl", "-q", "await_startup"]],
        url_fixture="rabbit_url",
    ),
    "postgres": Outage(
        "postgres",
        stop=[[*_postgres_cluster(), "stop"]],
        start=[[*_postgres_cluster(), "start"]],
        url_fixture="database_url",
    ),
}


@pytest.fixture(params=sorted(OUTAGES))
def outage(request: pytest.FixtureRequest) -> Iterator[Outage]:
    """Skips where the server is not this machine's; leaves it running whatever happens."""
    yield from _controlled(request, OUTAGES[request.param])


@pytest.fixture
def rabbitmq_outage(request: pytest.FixtureRequest) -> Iterator[Outage]:
    """RabbitMQ only, for tests about what runs on the bus."""
    yield from _controlled(request, OUTAGES["rabbitmq"])


def _controlled(request: pytest.FixtureRequest, chosen: Outage) -> Iterator[Outage]:
    url = str(request.getfixturevalue(chosen.url_fixture))
    host = urlsplit(url.replace("+asyncpg", "")).hostname
    if shutil.which(chosen.stop[0][0] or "-") is None or host not in ("127.0.0.1", "localhost"):
        pytest.skip(f"needs {chosen.server} on this machine and its control command")
    try:
        yield chosen
    finally:
        for command in chosen.start:
            subprocess.run(command, check=False, capture_output=True, timeout=120)


async def test_labels_streamed_across_a_server_restart_are_all_kept_and_announced_once(
    loop: Any, outage: Outage, storage: ObjectStorage
) -> None:
    # Deliveries are the retry budget of an event whose handler meets the outage: eight, with
    # the waits between them (0.2 s doubling to 5 s), outlast a restart of ten seconds or so.
    loop.platform = loop.platform.model_copy(update={"delivery_limit": 8})
    probe = await loop.stack.enter_async_context(
        EventProbe(loop.rabbit_url, loop.topology, LabelsSavedV1, ThresholdReachedV1, durable=True)
    )
    monitor = create_data_monitor(
        DataMonitorSettings(
            platform=loop.platform,
            namespace=loop.topology.namespace,
            db_schema=loop.schema("data-monitor"),
            data_bucket=loop.bucket,
            tick_interval_s=0.2,
        )
    )
    await loop.start(monitor)
    labeling = await loop.start_labeling()
    await e2e.create_project(labeling, loop, count=LABELS)
    images, classes = load_mnist("train", limit=LABELS)
    pngs = [to_png(image) for image in images]
    statuses: Counter[int] = Counter()
    accepted: list[str] = []
    work: asyncio.Queue[int] = asyncio.Queue()
    for index in range(LABELS):
        work.put_nowait(index)

    async def labeler(n: int) -> None:
        headers = loop.bearer(f"labeler-{n}", "labeler")
        while not work.empty():
            index = work.get_nowait()
            while True:
                response: httpx.Response = await labeling.post(
                    f"/v1/projects/{e2e.PROJECT}/labels",
                    headers=headers,
                    files={"image": (f"{index}.png", pngs[index], "image/png")},
                    data={"class_name": str(classes[index])},
                )
                statuses[response.status_code] += 1
                if response.status_code != 503:
                    break
                # A 503 names when to come back; the labeler does, as a labeling tool would.
                await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
            if response.status_code == 201:
                accepted.append(response.json()["label_id"])

    async def stop_and_start() -> float:
        await wait_for(lambda: _at_least(accepted, LABELS // 4), timeout=120, message="a quarter")
        for command in outage.stop:
            await asyncio.to_thread(run, *command)
        down = time.perf_counter()
        before, refused = len(accepted), statuses[503]
        if outage.server == "rabbitmq":
            # Labels keep being accepted while the broker is away (the outbox holds them).
            await wait_for(
                lambda: _at_least(accepted, before + LABELS // 4),
                timeout=120,
                message="labels accepted while the broker is down",
            )
        else:
            # Every labeler is told to come back later, none is left hanging.
            await wait_for(
                lambda: _at_least([""] * (statuses[503] - refused), LABELERS),
                timeout=120,
                message="503s while PostgreSQL is down",
            )
        for command in outage.start:
            await asyncio.to_thread(run, *command)
        return time.perf_counter() - down

    started = time.perf_counter()
    down_s, *_ = await asyncio.gather(stop_and_start(), *(labeler(n) for n in range(LABELERS)))
    stream_s = time.perf_counter() - started

    async def all_announced() -> bool:
        await probe.collect()
        announced = {str(i) for e in probe.of(LabelsSavedV1) for i in e.payload.label_ids}
        return announced >= set(accepted)

    await wait_for(all_announced, timeout=180, message="every accepted label in a labels.saved")
    await probe.wait(ThresholdReachedV1, timeout=60)
    engine = monitor.state.runtime.db.engine

    async def settled() -> bool:
        async with engine.connect() as conn:
            rows = await conn.execute(text("SELECT event_id FROM processed_messages"))
            handled = {row[0] for row in rows}
        return {e.event_id for e in probe.of(LabelsSavedV1)} <= handled

    await wait_for(settled, timeout=120, message="data-monitor handled every labels.saved")
    await probe.collect()
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(f'SELECT label_id::text, image_key FROM "{loop.schema("labeling")}".labels')  # noqa: S608
        )
        stored = {row[0]: row[1] for row in rows}
    images_there = await asyncio.gather(
        *(storage.exists(loop.bucket, stored[i]) for i in accepted if i in stored)
    )
    dead = await _dead_letters(loop.rabbit_url, monitor.state.runtime.topology.queue_names)
    print(
        f"\noutage={outage.server} labels={LABELS} accepted={len(accepted)} down_s={down_s:.1f} "
        f"stream_s={stream_s:.1f} statuses={dict(sorted(statuses.items()))} "
        f"labels_saved={len(probe.of(LabelsSavedV1))} "
        f"threshold_reached={len(probe.of(ThresholdReachedV1))} dlq_messages={sum(dead.values())}"
    )

    assert not [s for s in statuses if s >= 500 and s != 503], statuses
    assert len(set(accepted)) == LABELS
    assert set(accepted) <= set(stored), "an accepted label is missing from PostgreSQL"
    assert all(images_there), "an accepted label's image is missing from S3"
    assert len(probe.of(ThresholdReachedV1)) == 1
    assert sum(dead.values()) == 0, dead


async def _at_least(items: list[str], n: int) -> bool:
    return len(items) >= n


async def _dead_letters(rabbit_url: str, queues: list[str]) -> dict[str, int]:
    """Messages in each of ``queues`` that is a dead-letter queue."""
    counts: dict[str, int] = {}
    async with await aio_pika.connect(rabbit_url) as connection:
        channel = await connection.channel()
        for name in queues:
            if name.endswith(DLQ_SUFFIX):
                queue = await channel.declare_queue(name, passive=True)
                counts[name] = queue.declaration_result.message_count or 0
    return counts


CANARY_POLICY = e2e.POLICY.model_copy(
    update={
        "bake_s": 2.0,
        "threshold": 3,
        "margins": e2e.POLICY.margins.model_copy(update={"latency_slack_ms": 1000.0}),
    }
)
"""Two versions of one model: this test is about the canary going on, not about judging."""


async def test_a_canary_goes_on_to_its_verdict_across_a_broker_restart(
    loop: Any, mlflow_tracking_uri: str, triton_server: Any, rabbitmq_outage: Outage
) -> None:
    loop.with_mlflow(mlflow_tracking_uri)
    loop.platform = loop.platform.model_copy(update={"delivery_limit": 8})
    loop.stack.push_async_callback(loop.unserve, triton_server)
    champion, candidate = loop.register(seed=1), loop.register(seed=1)
    loop.mlflow().set_registered_model_alias(loop.model_line, "champion", champion)
    await loop.serve(triton_server, champion)
    probe = await loop.stack.enter_async_context(
        EventProbe(loop.rabbit_url, loop.topology, RolloutStepV1, CanaryVerdictV1, durable=True)
    )
    rollout = await loop.start_rollout(triton_server, CANARY_POLICY)
    bff = await loop.start_bff(triton_server)
    tool = await loop.stack.enter_async_context(e2e.LabelingTool(loop, bff.client))
    await tool.served(champion, n=5)
    await loop.publish(loop.validated(candidate, champion))
    await probe.wait(RolloutStepV1, timeout=120)
    await tool.served(candidate, n=2)

    for command in rabbitmq_outage.stop:
        await asyncio.to_thread(run, *command)
    down = time.perf_counter()
    answered = len(tool.answers)
    # Predictions go on while the broker is away (their logs are dropped, and counted).
    await wait_for(
        lambda: _at_least([""] * (len(tool.answers) - answered), 50),
        timeout=120,
        message="predictions answered while the broker is down",
    )
    served_down = len(tool.answers) - answered
    for command in rabbitmq_outage.start:
        await asyncio.to_thread(run, *command)
    down_s = time.perf_counter() - down

    [verdict] = await e2e.verdicts(probe, rollout.client, loop, timeout=240)
    steps = e2e.steps_of(probe.of(RolloutStepV1))
    dead = await _dead_letters(loop.rabbit_url, rollout.app.state.runtime.topology.queue_names)
    print(
        f"\noutage=rabbitmq during=canary down_s={down_s:.1f} served_while_down={served_down} "
        f"verdict={verdict.payload.verdict.value} steps={steps} "
        f"predict_failures={dict(tool.failures)} dlq_messages={sum(dead.values())}"
    )
    assert verdict.payload.verdict is CanaryOutcome.PROMOTED, verdict.payload.reasons
    assert steps == [(10, 1), (50, 2), (100, 3)]
    assert sum(dead.values()) == 0, dead
    await tool.served(candidate, n=5)
