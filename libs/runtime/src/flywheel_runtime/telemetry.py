"""OpenTelemetry tracer and meter providers, and the Prometheus registry, for one service.

Traces cross the broker in AMQP headers (W3C trace context, written by FastStream's telemetry
middleware and by the outbox), so one trace follows a batch of labels through the loop. Work
that a background loop does later for an event (a canary's steps and verdict) runs outside any
span: ``TRACE_CONTEXTS`` remembers the context each correlation id was last consumed under, and
the outbox publishes such events under it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from prometheus_client import CollectorRegistry


@dataclass
class Telemetry:
    """What a service uses to trace and measure itself."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    registry: CollectorRegistry

    def tracer(self, name: str) -> trace.Tracer:
        return self.tracer_provider.get_tracer(name)

    def meter(self, name: str) -> metrics.Meter:
        return self.meter_provider.get_meter(name)

    def shutdown(self) -> None:
        """Flush what is buffered; call once at shutdown."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def setup_telemetry(
    service: str,
    *,
    otel_endpoint: str | None = None,
    environment: str = "local",
    span_exporter: SpanExporter | None = None,
    set_global: bool = False,
) -> Telemetry:
    """Providers exporting over OTLP/HTTP when ``otel_endpoint`` is set.

    ``span_exporter`` adds a synchronous exporter (tests pass an in-memory one). The global
    providers are only replaced when asked: a process hosts one service, a test many.
    """
    resource = Resource.create(
        {"service.name": service, "deployment.environment.name": environment}
    )
    tracer_provider = TracerProvider(resource=resource)
    readers = []
    if otel_endpoint:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        base = otel_endpoint.rstrip("/")
        tracer_provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{base}/v1/traces"))
        )
        readers.append(
            PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=f"{base}/v1/metrics"))
        )
    if span_exporter is not None:
        tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    if set_global:
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
    return Telemetry(tracer_provider, meter_provider, CollectorRegistry())


class TraceContexts:
    """The trace context each correlation id was last handled under in this process (bounded,
    oldest forgotten first); lost on restart, when later events start a trace of their own."""

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._contexts: OrderedDict[str, Context] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, correlation_id: str, context: Context) -> None:
        if not trace.get_current_span(context).get_span_context().is_valid:
            return
        with self._lock:
            self._contexts[correlation_id] = context
            self._contexts.move_to_end(correlation_id)
            while len(self._contexts) > self._size:
                self._contexts.popitem(last=False)

    def recall(self, correlation_id: str) -> Context | None:
        with self._lock:
            return self._contexts.get(correlation_id)


TRACE_CONTEXTS = TraceContexts()
"""Filled by the broker's consumers, read by the outbox for events written outside a span."""
