import httpx
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from flywheel_runtime.app import ServiceRuntime, fastapi_app
from flywheel_runtime.settings import PlatformSettings


async def test_http_request_spans_belong_to_the_services_own_tracer_provider() -> None:
    exporters = {name: InMemorySpanExporter() for name in ("first", "second")}
    apps = [
        fastapi_app(
            ServiceRuntime.create(
                name, PlatformSettings(), span_exporter=exporter, configure_logs=False
            ),
            title=name,
        )
        for name, exporter in exporters.items()
    ]

    for app in apps:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/healthz")).status_code == 200

    for name, exporter in exporters.items():
        spans = exporter.get_finished_spans()
        assert spans, f"{name} recorded no request span"
        assert {s.resource.attributes["service.name"] for s in spans} == {name}
