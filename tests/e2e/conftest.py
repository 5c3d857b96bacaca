"""The services of the loop, each built by its own create_app, running on the real servers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from flywheel_runtime.auth import generate_dev_key, issue_dev_token
from flywheel_runtime.settings import PlatformSettings
from flywheel_runtime.topology import Topology
from flywheel_testing.rabbit import delete_names
from flywheel_testing.s3 import S3Server
from flywheel_vision.data import load_mnist, to_png


@dataclass
class Loop:
    """What the services of one test share: servers, names, a signing key, and their lifespans."""

    platform: PlatformSettings
    topology: Topology
    bucket: str
    rabbit_url: str
    key: str = field(default_factory=lambda: generate_dev_key("EC"))
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    stack: AsyncExitStack = field(default_factory=AsyncExitStack)
    apps: list[FastAPI] = field(default_factory=list)

    def schema(self, service: str) -> str:
        return f"{service.replace('-', '_')}_{self.suffix}"

    def bearer(self, subject: str, *roles: str) -> dict[str, str]:
        token = issue_dev_token(self.key, subject=subject, roles=roles)
        return {"Authorization": f"Bearer {token}"}

    def with_mlflow(self, tracking_uri: str) -> None:
        self.platform = self.platform.model_copy(update={"mlflow_uri": tracking_uri})

    async def start(self, app: FastAPI) -> httpx.AsyncClient:
        """Run ``app``'s lifespan until the test ends; a client that calls it in-process."""
        await self.stack.enter_async_context(app.router.lifespan_context(app))
        self.apps.append(app)
        return await self.stack.enter_async_context(
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60
            )
        )


@pytest.fixture
async def loop(
    rabbit_url: str,
    database_url: str,
    s3_server: S3Server,
    topology: Topology,
    unique_bucket: str,
) -> AsyncIterator[Loop]:
    platform = PlatformSettings(
        rabbit_url=SecretStr(rabbit_url),
        database_url=SecretStr(database_url),
        s3_endpoint=s3_server.endpoint,
        s3_access_key=SecretStr(s3_server.access_key),
        s3_secret_key=SecretStr(s3_server.secret_key),
        delivery_limit=topology.delivery_limit,
        log_json=False,
    )
    built = Loop(platform, topology, unique_bucket, rabbit_url)
    async with built.stack:
        yield built
    queues = {q for app in built.apps for q in app.state.runtime.topology.queue_names}
    await delete_names(rabbit_url, sorted(queues), [])


async def create_project(client: httpx.AsyncClient, loop: Loop, count: int) -> None:
    created = await client.post(
        "/v1/projects",
        headers=loop.bearer("ada", "admin"),
        json={
            "project_id": "digits",
            "name": "Digits",
            "class_names": [str(d) for d in range(10)],
            "model_line": "digits-classifier",
            "policy": {"count": count},
        },
    )
    assert created.status_code == 201, created.text


async def post_mnist(
    client: httpx.AsyncClient, loop: Loop, count: int, clients: int = 32
) -> list[str]:
    """Post the first ``count`` MNIST training digits, one label per request, from ``clients``."""
    images, classes = load_mnist("train", limit=count)
    work: asyncio.Queue[int] = asyncio.Queue()
    for index in range(count):
        work.put_nowait(index)

    async def labeler(n: int) -> list[str]:
        headers = loop.bearer(f"labeler-{n}", "labeler")
        label_ids = []
        while not work.empty():
            index = work.get_nowait()
            response = await client.post(
                "/v1/projects/digits/labels",
                headers=headers,
                files={"image": (f"{index}.png", to_png(images[index]), "image/png")},
                data={"class_name": str(classes[index])},
            )
            assert response.status_code == 201, response.text
            label_ids.append(response.json()["label_id"])
        return label_ids

    return [i for ids in await asyncio.gather(*map(labeler, range(clients))) for i in ids]
