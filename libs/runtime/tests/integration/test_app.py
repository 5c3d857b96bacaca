import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import APIRouter
from pydantic import BaseModel, SecretStr
from sqlalchemy import text

from flywheel_contracts import LabelsSavedV1
from flywheel_runtime.app import ServiceRuntime, asgi_app, fastapi_app
from flywheel_runtime.errors import DependencyUnavailableError, InvalidInputError
from flywheel_runtime.outbox import add_event
from flywheel_runtime.settings import PlatformSettings
from flywheel_testing.rabbit import delete_names, unique_namespace
from flywheel_testing.wait import wait_for

pytestmark = pytest.mark.integration


class LabelIn(BaseModel):
    project_id: str
    class_name: str


@pytest.fixture
def platform(rabbit_url: str, database_url: str) -> PlatformSettings:
    return PlatformSettings(
        rabbit_url=SecretStr(rabbit_url),
        database_url=SecretStr(database_url),
        log_json=True,
    )


@pytest.fixture
async def runtime(platform: PlatformSettings, rabbit_url: str) -> AsyncIterator[ServiceRuntime]:
    built = ServiceRuntime.create(
        "labeling",
        platform,
        schema=f"labeling_{uuid.uuid4().hex[:8]}",
        outbox=True,
        namespace=unique_namespace(),
        configure_logs=False,
    )
    yield built
    topology = built.topology
    await delete_names(
        rabbit_url,
        topology.queue_names,
        [
            topology.events_exchange.name,
            topology.inference_exchange.name,
            topology.dead_letter_exchange.name,
        ],
    )


def _api(runtime: ServiceRuntime, seen: list[LabelsSavedV1]) -> APIRouter:
    router = APIRouter()

    @router.post("/labels", status_code=201)
    async def post_label(label: LabelIn) -> dict[str, str]:
        assert runtime.db is not None
        event = LabelsSavedV1(payload={**LabelsSavedV1.EXAMPLE, "project_id": label.project_id})
        async with runtime.db.transaction() as session:
            await add_event(session, event)
        return {"event_id": str(event.event_id)}

    @router.get("/invalid")
    async def invalid() -> None:
        raise InvalidInputError("class 'cat' is not in project 'digits'", details={"field": "x"})

    @router.get("/down")
    async def down() -> None:
        raise DependencyUnavailableError("database unavailable", retry_after_s=7)

    @router.get("/bug")
    async def bug() -> None:
        raise KeyError("secret internal detail")

    @runtime.broker.subscriber(
        runtime.topology.queue("probe", LabelsSavedV1),
        runtime.topology.exchange_for(LabelsSavedV1),
    )
    async def probe(event: LabelsSavedV1) -> None:
        seen.append(event)

    return router


async def test_fastapi_service_serves_ops_routes_errors_and_publishes(
    runtime: ServiceRuntime,
) -> None:
    seen: list[LabelsSavedV1] = []
    app = fastapi_app(runtime, title="labeling", routers=[_api(runtime, seen)])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)

    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
    ):
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"broker": "ok", "database": "ok"}

        created = await client.post("/labels", json={"project_id": "digits", "class_name": "7"})
        assert created.status_code == 201

        async def delivered() -> bool:
            return len(seen) == 1

        await wait_for(delivered, message="event published through the outbox")
        assert str(seen[0].event_id) == created.json()["event_id"]

        missing = await client.post("/labels", json={"project_id": "digits"})
        assert missing.status_code == 422
        assert missing.json()["error"]["code"] == "invalid_input"
        assert "class_name" in missing.json()["error"]["message"]

        invalid = await client.get("/invalid")
        assert invalid.status_code == 422
        assert invalid.json() == {
            "error": {
                "code": "invalid_input",
                "message": "class 'cat' is not in project 'digits'",
                "details": {"field": "x"},
            }
        }

        down = await client.get("/down")
        assert down.status_code == 503
        assert down.headers["retry-after"] == "7"

        bug = await client.get("/bug")
        assert bug.status_code == 500
        assert "secret" not in bug.text

        metrics = await client.get("/metrics")
        assert "faststream_received_messages_total" in metrics.text

    assert runtime.db is not None
    async with runtime.db.engine.connect() as conn:
        pending = await conn.execute(text("SELECT count(*) FROM outbox WHERE published_at IS NULL"))
        assert pending.scalar_one() == 0


async def test_readyz_reports_a_dependency_that_is_down(runtime: ServiceRuntime) -> None:
    app = fastapi_app(runtime, title="labeling")
    transport = httpx.ASGITransport(app=app)

    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
    ):

        async def broken() -> None:
            raise DependencyUnavailableError("s3 unavailable")

        runtime.checks["s3"] = broken
        ready = await client.get("/readyz")

    assert ready.status_code == 503
    assert ready.json()["checks"]["s3"] == "failed: DependencyUnavailableError"
    assert ready.json()["checks"]["database"] == "ok"


async def test_broker_only_service_serves_ops_routes(runtime: ServiceRuntime) -> None:
    app = asgi_app(runtime)
    transport = httpx.ASGITransport(app=app)

    async with (
        app.start_lifespan_context(),
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
    ):
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        metrics = await client.get("/metrics")

    assert ready.status_code == 200
    assert ready.json()["checks"] == {"broker": "ok", "database": "ok"}
    assert metrics.status_code == 200
