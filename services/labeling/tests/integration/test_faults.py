import uuid

import pytest
from sqlalchemy.engine import make_url

from flywheel_testing.proxy import TcpProxy
from flywheel_testing.s3 import S3Server
from flywheel_testing.wait import wait_for

from .conftest import ServiceFactory

pytestmark = pytest.mark.integration


def _port(url: str, default: int) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0]) if url.count(":") > 1 else default


async def test_an_unreachable_database_is_503_with_retry_after_and_half_writes_nothing(
    start_service: ServiceFactory, database_url: str, image
) -> None:
    target = make_url(database_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
    await proxy.start()
    proxied = target.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    try:
        async with start_service(database=proxied) as service:
            project = await service.create_project()
            assert (await service.post_label(project, image(1), "1")).status_code == 201
            await proxy.stop()

            cached_project = await service.post_label(project, image(2), "2")
            read = await service.client.get(f"/v1/projects/{project}", headers=service.headers)

            await proxy.start()
            assert cached_project.status_code == 503, cached_project.text
            assert cached_project.headers["retry-after"] == "5"
            assert read.status_code == 503
            assert read.headers["retry-after"] == "5"
            assert await service.rows("labels", project) == 1
            assert await service.rows("snapshots", project) == 1
    finally:
        await proxy.stop()


async def test_unreachable_s3_is_503_and_commits_nothing(
    start_service: ServiceFactory, s3_server: S3Server, image
) -> None:
    host, port = s3_server.endpoint.rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    try:
        async with start_service(s3=f"127.0.0.1:{proxy.port}") as service:
            project = await service.create_project()
            await proxy.stop()

            response = await service.post_label(project, image(1), "1")

            await proxy.start()
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "5"
            assert await service.rows("labels", project) == 0
    finally:
        await proxy.stop()


async def test_labels_accepted_while_the_broker_is_away_are_announced_when_it_returns(
    start_service: ServiceFactory, rabbit_url: str, image
) -> None:
    proxy = TcpProxy("127.0.0.1", _port(rabbit_url, 5672))
    await proxy.start()
    credentials = rabbit_url.split("//", 1)[1].rsplit("@", 1)[0]
    try:
        async with start_service(rabbit=f"amqp://{credentials}@127.0.0.1:{proxy.port}/") as service:
            runtime = service.runtime
            # Reconnect and retry quickly, so the test does not wait out production back-offs.
            runtime.broker._connection_kwargs["reconnect_interval"] = 0.2
            assert runtime.relay is not None
            runtime.relay._max_backoff_s = 0.5
            project = await service.create_project()
            await proxy.stop()

            accepted = [await service.post_label(project, image(i), str(i)) for i in range(5)]

            assert [r.status_code for r in accepted] == [201] * 5
            assert service.probe.labels_saved(project) == []
            await proxy.start()
            expected = {uuid.UUID(r.json()["label_id"]) for r in accepted}

            async def announced() -> bool:
                events = service.probe.labels_saved(project)
                return {i for e in events for i in e.payload.label_ids} == expected

            await wait_for(announced, timeout=30, message="labels announced after the broker")
    finally:
        await proxy.stop()
