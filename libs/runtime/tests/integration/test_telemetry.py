import uuid

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from flywheel_contracts import LabelsSavedV1
from flywheel_runtime.db import Database
from flywheel_runtime.messaging import create_broker, publish_event, start_broker
from flywheel_runtime.migrations import migrate
from flywheel_runtime.outbox import BrokerOutboxPublisher, OutboxRelay, add_event
from flywheel_runtime.telemetry import Telemetry, setup_telemetry
from flywheel_runtime.topology import Topology
from flywheel_testing.wait import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def telemetry(exporter: InMemorySpanExporter) -> Telemetry:
    return setup_telemetry("test", span_exporter=exporter)


def _consumer_span(exporter: InMemorySpanExporter, trace_id: int) -> ReadableSpan | None:
    for span in exporter.get_finished_spans():
        if span.kind is SpanKind.CONSUMER and span.context.trace_id == trace_id:
            return span
    return None


def _ancestors(exporter: InMemorySpanExporter, span: ReadableSpan) -> list[str]:
    by_id = {s.context.span_id: s for s in exporter.get_finished_spans()}
    names = []
    parent = span.parent
    while parent is not None and parent.span_id in by_id:
        ancestor = by_id[parent.span_id]
        names.append(ancestor.name)
        parent = ancestor.parent
    return names


async def test_consumer_span_is_a_child_of_the_span_that_published(
    rabbit_url: str, topology: Topology, telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    broker = create_broker(rabbit_url, app_id="test", tracer_provider=telemetry.tracer_provider)
    received: list[LabelsSavedV1] = []

    @broker.subscriber(topology.queue("svc", LabelsSavedV1), topology.exchange_for(LabelsSavedV1))
    async def handle(event: LabelsSavedV1) -> None:
        received.append(event)

    await start_broker(broker, topology)
    try:
        with telemetry.tracer("test").start_as_current_span("POST /labels") as root:
            await publish_event(broker, topology, LabelsSavedV1.example())
        trace_id = root.get_span_context().trace_id

        async def consumed() -> ReadableSpan | None:
            return _consumer_span(exporter, trace_id)

        span = await wait_for(consumed, message="consumer span exported")
    finally:
        await broker.stop()

    assert span.parent is not None
    assert _ancestors(exporter, span)[-1] == "POST /labels"
    assert len(received) == 1


async def test_trace_survives_the_outbox(
    rabbit_url: str,
    database_url: str,
    topology: Topology,
    telemetry: Telemetry,
    exporter: InMemorySpanExporter,
) -> None:
    db = Database(database_url, schema=f"svc_{uuid.uuid4().hex[:8]}")
    await migrate(database_url, db.schema)
    broker = create_broker(rabbit_url, app_id="test", tracer_provider=telemetry.tracer_provider)
    received: list[LabelsSavedV1] = []

    @broker.subscriber(topology.queue("svc", LabelsSavedV1), topology.exchange_for(LabelsSavedV1))
    async def handle(event: LabelsSavedV1) -> None:
        received.append(event)

    await start_broker(broker, topology)
    relay = OutboxRelay(db, BrokerOutboxPublisher(broker, topology))
    try:
        with telemetry.tracer("test").start_as_current_span("POST /labels") as root:
            async with db.transaction() as session:
                await add_event(session, LabelsSavedV1.example())
        trace_id = root.get_span_context().trace_id
        relay.start()

        async def consumed() -> ReadableSpan | None:
            return _consumer_span(exporter, trace_id)

        span = await wait_for(consumed, message="consumer span exported")
    finally:
        await relay.stop()
        await broker.stop()
        await db.dispose()

    assert _ancestors(exporter, span)[-1] == "POST /labels"
    assert len(received) == 1
