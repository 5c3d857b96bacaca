import asyncio
import contextlib
import json
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import aio_pika
import httpx
import pytest
from fastapi import FastAPI
from minio import Minio
from pydantic import SecretStr
from sqlalchemy import text

from flywheel_contracts import LabelsSavedV1, ProjectConfiguredV1
from flywheel_contracts.topology import EVENTS_EXCHANGE
from flywheel_labeling.main import create_app
from flywheel_labeling.settings import LabelingSettings
from flywheel_runtime.app import ServiceRuntime
from flywheel_runtime.auth import AuthSettings, generate_dev_key, issue_dev_token
from flywheel_runtime.db import Database
from flywheel_runtime.settings import PlatformSettings
from flywheel_testing.rabbit import delete_names, unique_namespace
from flywheel_testing.s3 import S3Server
from flywheel_testing.wait import wait_for

WEBHOOK_SECRET = "label-studio-shared-secret"
DIGITS = [str(d) for d in range(10)]


@pytest.fixture(scope="session")
def dev_key() -> str:
    return generate_dev_key("EC")


SERVED: dict[str, bytes] = {}
"""Paths the image server answers, and their bodies; tests add their own (unique) paths."""


class _ImageHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/elsewhere/"):
            self.send_response(302)
            self.send_header("Location", "http://203.0.113.9/image.png")
            self.end_headers()
            return
        body = SERVED.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests assert on what matters."""


@pytest.fixture(scope="session")
def image_server() -> Iterator[str]:
    """An http server on 127.0.0.1 serving ``SERVED``: where Label Studio tasks point."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


class Probe:
    """A queue bound on the test topology that records every event the service publishes."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None

    async def start(self, url: str, namespace: str) -> None:
        self._connection = await aio_pika.connect_robust(url)
        channel = await self._connection.channel()
        exchange = await channel.declare_exchange(
            namespace + EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for event in (LabelsSavedV1, ProjectConfiguredV1):
            await queue.bind(exchange, routing_key=event.routing_key())
        await queue.consume(self._on_message, no_ack=True)

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.bodies.append(json.loads(message.body))

    async def stop(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    def labels_saved(self, project_id: str | None = None) -> list[LabelsSavedV1]:
        events = [
            LabelsSavedV1.model_validate(b) for b in self.bodies if b["type"] == LabelsSavedV1.TYPE
        ]
        return [e for e in events if project_id is None or e.payload.project_id == project_id]

    def configured(self, project_id: str) -> list[ProjectConfiguredV1]:
        return [
            ProjectConfiguredV1.model_validate(b)
            for b in self.bodies
            if b["type"] == ProjectConfiguredV1.TYPE and b["payload"]["project_id"] == project_id
        ]

    async def wait_labels_saved(self, project_id: str, count: int = 1) -> list[LabelsSavedV1]:
        async def enough() -> list[LabelsSavedV1]:
            found = self.labels_saved(project_id)
            return found if len(found) >= count else []

        return await wait_for(enough, timeout=15, message=f"{count} labels.saved")


@dataclass
class Service:
    """The labeling app, running inside its lifespan, and what a test needs around it."""

    app: FastAPI
    client: httpx.AsyncClient
    settings: LabelingSettings
    probe: Probe
    s3: Minio
    token_for: Callable[..., str]
    headers: dict[str, str] = field(default_factory=dict)
    admin: dict[str, str] = field(default_factory=dict)

    @property
    def runtime(self) -> ServiceRuntime:
        runtime: ServiceRuntime = self.app.state.runtime
        return runtime

    @property
    def db(self) -> Database:
        assert self.runtime.db is not None
        return self.runtime.db

    async def create_project(
        self, project_id: str | None = None, classes: list[str] | None = None, **extra: Any
    ) -> str:
        project_id = project_id or f"p-{uuid.uuid4().hex[:10]}"
        response = await self.client.post(
            "/v1/projects",
            json={"project_id": project_id, "name": project_id, "class_names": classes or DIGITS}
            | extra,
            headers=self.admin,
        )
        assert response.status_code == 201, response.text
        return project_id

    async def post_label(
        self,
        project_id: str,
        data: bytes,
        class_name: str | None = "7",
        *,
        content_type: str = "image/png",
        headers: dict[str, str] | None = None,
        **fields: str,
    ) -> httpx.Response:
        form = dict(fields)
        if class_name is not None:
            form["class_name"] = class_name
        return await self.client.post(
            f"/v1/projects/{project_id}/labels",
            data=form,
            files={"image": ("digit.png", data, content_type)},
            headers=headers if headers is not None else self.headers,
        )

    async def webhook(
        self, project_id: str, payload: dict[str, Any], secret: str | None = WEBHOOK_SECRET
    ) -> httpx.Response:
        headers = {} if secret is None else {"X-Flywheel-Webhook-Secret": secret}
        return await self.client.post(
            f"/v1/projects/{project_id}/integrations/label-studio/webhook",
            json=payload,
            headers=headers,
        )

    async def snapshot(self, project_id: str, snapshot_id: str) -> dict[str, Any]:
        response = await self.client.get(
            f"/v1/projects/{project_id}/snapshots/{snapshot_id}", headers=self.headers
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def label_ids(self, project_id: str) -> set[uuid.UUID]:
        async with self.db.engine.connect() as conn:
            result = await conn.execute(
                text("SELECT label_id FROM labels WHERE project_id = :project"),
                {"project": project_id},
            )
            return {row[0] for row in result}

    async def events_since(
        self, project_id: str, before: int, marker_image: bytes
    ) -> list[LabelsSavedV1]:
        """labels.saved of ``project_id`` after the first ``before``, up to a marker label.

        The marker is posted now and its event awaited; the outbox publishes in commit order
        and the probe queue keeps it, so any event caused earlier has arrived by then.
        """
        response = await self.post_label(project_id, marker_image, "0")
        assert response.status_code == 201, response.text
        marker = uuid.UUID(response.json()["label_id"])

        async def marker_seen() -> list[LabelsSavedV1]:
            events = self.probe.labels_saved(project_id)[before:]
            return events if any(marker in e.payload.label_ids for e in events) else []

        return await wait_for(marker_seen, timeout=15, message="marker labels.saved")

    async def rows(self, table: str, project_id: str | None = None) -> int:
        where = "" if project_id is None else " WHERE project_id = :project"
        async with self.db.engine.connect() as conn:
            result = await conn.execute(
                text(f"SELECT count(*) FROM {table}{where}"),  # noqa: S608 - test tables
                {"project": project_id},
            )
            return int(result.scalar_one())

    async def objects(self, prefix: str = "") -> list[str]:
        bucket = self.settings.data_bucket
        return await asyncio.to_thread(
            lambda: sorted(
                o.object_name or ""
                for o in self.s3.list_objects(bucket, prefix=prefix, recursive=True)
            )
        )


ServiceFactory = Callable[..., contextlib.AbstractAsyncContextManager[Service]]


@pytest.fixture
def start_service(
    rabbit_url: str,
    database_url: str,
    s3_server: S3Server,
    unique_bucket: str,
    dev_key: str,
    image_server: str,
) -> ServiceFactory:
    """Starts the app with a fresh namespace and schema; keyword overrides go to settings."""

    @contextlib.asynccontextmanager
    async def start(
        *,
        rabbit: str | None = None,
        database: str | None = None,
        s3: str | None = None,
        platform: dict[str, Any] | None = None,
        **extra: Any,
    ) -> AsyncIterator[Service]:
        namespace = unique_namespace()
        settings = LabelingSettings(
            platform=PlatformSettings(
                rabbit_url=SecretStr(rabbit or rabbit_url),
                database_url=SecretStr(database or database_url),
                s3_endpoint=s3 or s3_server.endpoint,
                s3_access_key=SecretStr(s3_server.access_key),
                s3_secret_key=SecretStr(s3_server.secret_key),
                log_json=True,
                **(platform or {}),
            ),
            auth=AuthSettings(dev_signing_key=SecretStr(dev_key)),
            webhook_secret=SecretStr(WEBHOOK_SECRET),
            namespace=namespace,
            db_schema=f"labeling_{uuid.uuid4().hex[:10]}",
            data_bucket=unique_bucket,
            image_fetch_allowed_hosts=["127.0.0.1"],
            **extra,
        )
        app = create_app(settings)

        def token_for(username: str, *roles: str) -> str:
            return issue_dev_token(dev_key, subject=username, username=username, roles=roles)

        probe = Probe()
        s3_client = Minio(
            s3_server.endpoint, s3_server.access_key, s3_server.secret_key, secure=False
        )
        transport = httpx.ASGITransport(app=app)
        try:
            async with (
                app.router.lifespan_context(app),
                httpx.AsyncClient(
                    transport=transport, base_url="http://labeling.test", timeout=30
                ) as client,
            ):
                await probe.start(rabbit_url, namespace)
                yield Service(
                    app=app,
                    client=client,
                    settings=settings,
                    probe=probe,
                    s3=s3_client,
                    token_for=token_for,
                    headers={"Authorization": f"Bearer {token_for('alice', 'labeler')}"},
                    admin={"Authorization": f"Bearer {token_for('root', 'admin')}"},
                )
        finally:
            await probe.stop()
            topology = app.state.runtime.topology
            await delete_names(
                rabbit_url,
                queues=topology.queue_names,
                exchanges=[
                    topology.events_exchange.name,
                    topology.inference_exchange.name,
                    topology.dead_letter_exchange.name,
                ],
            )

    return start


@pytest.fixture
async def service(start_service: ServiceFactory) -> AsyncIterator[Service]:
    async with start_service() as running:
        yield running
