import uuid
from typing import Any

from faststream.rabbit import TestRabbitBroker
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from flywheel_contracts import LabelsSavedV1
from flywheel_runtime.messaging import create_broker
from flywheel_runtime.outbox import add_event
from flywheel_runtime.telemetry import TRACE_CONTEXTS, TraceContexts, setup_telemetry


class RecordingSession:
    """Just enough of an ``AsyncSession`` for ``add_event``: keeps what it was asked to run."""

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}
        self.params: list[dict[str, Any]] = []

    async def execute(self, statement: Any) -> None:
        self.params.append(dict(statement.compile().params))


def traceparent_of(span: trace.Span) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def test_contexts_are_remembered_per_correlation_id_and_the_oldest_forgotten() -> None:
    tracer = setup_telemetry("test").tracer("test")
    contexts = TraceContexts(size=2)
    spans = [tracer.start_span(f"s{i}") for i in range(3)]

    for index, span in enumerate(spans):
        contexts.remember(f"c{index}", trace.set_span_in_context(span))
    contexts.remember("invalid", trace.set_span_in_context(trace.INVALID_SPAN))

    assert contexts.recall("c0") is None
    assert contexts.recall("invalid") is None
    recalled = contexts.recall("c2")
    assert recalled is not None
    assert trace.get_current_span(recalled) is spans[2]


async def test_an_event_written_outside_any_span_continues_its_correlation_ids_trace() -> None:
    tracer = setup_telemetry("test").tracer("test")
    event = LabelsSavedV1.example()
    consumed = tracer.start_span("consumed earlier")
    TRACE_CONTEXTS.remember(str(event.correlation_id), trace.set_span_in_context(consumed))
    session = RecordingSession()

    await add_event(session, event)  # type: ignore[arg-type]

    [row] = session.params
    assert row["headers"] == {"traceparent": traceparent_of(consumed)}


async def test_an_event_written_inside_a_span_keeps_that_span_as_its_parent() -> None:
    tracer = setup_telemetry("test").tracer("test")
    event = LabelsSavedV1.example()
    TRACE_CONTEXTS.remember(
        str(event.correlation_id), trace.set_span_in_context(tracer.start_span("other"))
    )
    session = RecordingSession()

    with tracer.start_as_current_span("request") as current:
        await add_event(session, event)  # type: ignore[arg-type]

    [row] = session.params
    assert row["headers"] == {"traceparent": traceparent_of(current)}


async def test_consuming_a_message_remembers_the_consumer_span_under_its_correlation_id() -> None:
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry("test", span_exporter=exporter)
    broker = create_broker(
        "amqp://guest:guest@localhost:5672/",
        app_id="test",
        tracer_provider=telemetry.tracer_provider,
    )
    correlation_id = str(uuid.uuid4())
    seen: list[trace.SpanContext] = []

    @broker.subscriber("trace-memory")
    async def handle(body: dict[str, Any]) -> None:
        seen.append(trace.get_current_span().get_span_context())

    async with TestRabbitBroker(broker) as test_broker:
        await test_broker.publish({"n": 1}, "trace-memory", correlation_id=correlation_id)

    recalled = TRACE_CONTEXTS.recall(correlation_id)
    assert recalled is not None
    remembered = trace.get_current_span(recalled).get_span_context()
    assert remembered == seen[0]
    [process] = [
        s
        for s in exporter.get_finished_spans()
        if s.kind is SpanKind.CONSUMER and s.context == remembered
    ]
    assert process.name.endswith("process")
