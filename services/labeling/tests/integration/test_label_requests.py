import asyncio
import base64
import hashlib
import io
import json
import uuid
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from flywheel_contracts import LabelsRequestedV1
from flywheel_contracts.datasets import image_key
from flywheel_contracts.topology import DELIVERIES_HEADER, ERROR_HEADER, REASON_HEADER
from flywheel_runtime.messaging import publish_event
from flywheel_testing.proxy import TcpProxy
from flywheel_testing.rabbit import drain, queue_depth
from flywheel_testing.wait import wait_for

from .conftest import Service, ServiceFactory

pytestmark = pytest.mark.integration


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def labels_requested(project: str, *images: tuple[bytes, float]) -> LabelsRequestedV1:
    return LabelsRequestedV1.model_validate(
        {
            "payload": {
                "project_id": project,
                "model_line": f"{project}-classifier",
                "request_id": uuid.uuid4(),
                "reason": "drift",
                "report_id": uuid.uuid4(),
                "items": [
                    {
                        "input_sha256": sha(data),
                        "image_key": image_key(sha(data)),
                        "score": score,
                        "predicted_class": "8",
                        "confidence": 0.41,
                    }
                    for data, score in images
                ],
            }
        }
    )


async def serve(service: Service, *images: bytes) -> None:
    """Store inputs where serving keeps them: the data bucket, under their content address."""
    for data in images:
        await asyncio.to_thread(
            service.s3.put_object,
            service.settings.data_bucket,
            image_key(sha(data)),
            io.BytesIO(data),
            len(data),
            content_type="image/png",
        )


async def publish(service: Service, event: LabelsRequestedV1) -> None:
    await publish_event(service.runtime.broker, service.runtime.topology, event)


async def publish_raw(service: Service, body: bytes, message_id: str) -> None:
    topology = service.runtime.topology
    await service.runtime.broker.publish(
        body,
        exchange=topology.exchange_for(LabelsRequestedV1),
        routing_key=LabelsRequestedV1.routing_key(),
        message_id=message_id,
        content_type="application/json",
        persist=True,
    )


async def queue(service: Service, project: str, status: str = "open") -> list[dict[str, Any]]:
    response = await service.client.get(
        f"/v1/projects/{project}/label-requests",
        params={"status": status},
        headers=service.headers,
    )
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def wait_queue(service: Service, project: str, n: int) -> list[dict[str, Any]]:
    async def listed() -> list[dict[str, Any]]:
        items = await queue(service, project)
        return items if len(items) >= n else []

    return await wait_for(listed, timeout=15, message=f"{n} open label requests")


def subscription(service: Service) -> tuple[str, str]:
    """The labels.requested queue of this run and its dead-letter queue."""
    topology = service.runtime.topology
    [name] = [n for n in topology.queue_names if n.endswith("labeling.labels.requested")]
    return name, topology.dead_letter_queue(name).name


def processed(service: Service) -> float:
    """Deliveries the handler finished with, whatever the outcome (Prometheus counter)."""
    return sum(
        sample.value
        for metric in service.runtime.telemetry.registry.collect()
        for sample in metric.samples
        if sample.name == "faststream_received_processed_messages_total"
    )


async def test_requested_images_are_queued_by_score_and_a_saved_label_answers_one(
    service: Service, image
) -> None:
    project = await service.create_project()
    top, middle, low = image(1), image(2), image(3)
    await serve(service, top, middle, low)

    await publish(service, labels_requested(project, (low, 0.2), (top, 0.9), (middle, 0.5)))

    items = await wait_queue(service, project, 3)
    assert [i["input_sha256"] for i in items] == [sha(top), sha(middle), sha(low)]
    assert items[0]["image_key"] == image_key(sha(top))
    fetched = await service.client.get(items[0]["image_url"], headers=service.headers)
    assert fetched.status_code == 200, fetched.text
    assert (fetched.content, fetched.headers["content-type"]) == (top, "image/png")

    # The labeling tool labels the top image by reference (beside an image nobody asked
    # for), the middle one by uploading its bytes.
    by_reference = await service.client.post(
        f"/v1/projects/{project}/labels:batch",
        json={
            "items": [
                {"image_uri": items[0]["image_uri"], "class_name": "3"},
                {"image_base64": base64.b64encode(image(4)).decode(), "class_name": "4"},
            ]
        },
        headers=service.headers,
    )
    uploaded = await service.post_label(project, middle, "5", predicted_class="8")

    assert by_reference.status_code == 200, by_reference.text
    assert uploaded.status_code == 201, uploaded.text
    labeled = {i["input_sha256"]: i for i in await queue(service, project, "labeled")}
    assert labeled[sha(top)]["labeled_label_id"] == by_reference.json()["items"][0]["label_id"]
    assert labeled[sha(middle)]["labeled_label_id"] == uploaded.json()["label_id"]
    assert [i["input_sha256"] for i in await queue(service, project)] == [sha(low)]

    dismissed = await service.client.post(
        f"/v1/projects/{project}/label-requests/{sha(low)}:dismiss", headers=service.headers
    )
    assert dismissed.status_code == 200, dismissed.text
    assert dismissed.json()["status"] == "dismissed"
    assert await queue(service, project) == []
    assert [i["input_sha256"] for i in await queue(service, project, "dismissed")] == [sha(low)]


async def test_a_redelivered_or_repeated_request_keeps_one_entry_per_image(
    service: Service, rabbit_url: str, image
) -> None:
    project = await service.create_project()
    data = image(1)
    await serve(service, data)
    first = labels_requested(project, (data, 0.7))
    later = labels_requested(project, (data, 0.4))

    for event in (first, first, later, later):
        await publish(service, event)

    async def all_handled() -> bool:
        return processed(service) >= 4

    await wait_for(all_handled, timeout=15, message="every copy handled")
    [entry] = await queue(service, project)
    assert entry["score"] == 0.7
    assert entry["request_id"] == str(later.payload.request_id)
    assert await service.rows("label_requests", project) == 1
    assert await queue_depth(rabbit_url, subscription(service)[1]) == 0


async def test_a_poison_labels_requested_is_dead_lettered_and_the_queue_keeps_flowing(
    service: Service, rabbit_url: str, image
) -> None:
    project = await service.create_project()
    good = image(1)
    await serve(service, good)
    nan_score = labels_requested(project, (image(2), 0.5)).model_dump(mode="json")
    nan_score["payload"]["items"][0]["score"] = float("nan")
    poisons = {
        "not-json": b"\x00not json {",
        "schema": json.dumps({"type": "labels.requested", "payload": {"items": []}}).encode(),
        "nan-score": json.dumps(nan_score).encode(),
    }

    for name, body in poisons.items():
        await publish_raw(service, body, message_id=name)
    await publish(service, labels_requested(project, (good, 0.9)))

    _, dlq = subscription(service)

    async def dead_lettered() -> bool:
        return await queue_depth(rabbit_url, dlq) >= len(poisons)

    await wait_for(dead_lettered, timeout=15, message="poison dead-lettered")
    [entry] = await wait_queue(service, project, 1)
    dead = {m.message_id: m for m in await drain(rabbit_url, dlq)}
    limit = service.settings.platform.delivery_limit
    assert sorted(dead) == sorted(poisons)
    for message in dead.values():
        headers = message.headers or {}
        assert headers[REASON_HEADER] == "rejected"
        deliveries = headers[DELIVERIES_HEADER]
        assert isinstance(deliveries, int)
        assert 1 <= deliveries <= limit
    assert "InvalidLabelsRequestedError" in str(dead["nan-score"].headers[ERROR_HEADER])
    assert "payload.items.0.score" in str(dead["nan-score"].headers[ERROR_HEADER])
    assert entry["input_sha256"] == sha(good)
    assert await service.rows("label_requests", project) == 1


async def test_a_request_that_keeps_failing_is_retried_up_to_the_limit_then_dead_lettered(
    start_service: ServiceFactory, database_url: str, rabbit_url: str, image
) -> None:
    target = make_url(database_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
    await proxy.start()
    proxied = target.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    limit = 2
    try:
        async with start_service(
            database=proxied,
            platform={"delivery_limit": limit, "retry_delay_s": 0.05, "retry_delay_max_s": 0.1},
        ) as service:
            project = await service.create_project()
            event = labels_requested(project, (image(1), 0.9))
            await proxy.stop()

            await publish(service, event)

            _, dlq = subscription(service)

            async def dead_lettered() -> bool:
                return await queue_depth(rabbit_url, dlq) >= 1

            await wait_for(dead_lettered, timeout=30, message="dead-lettered at the limit")
            await proxy.start()
            [dead] = await drain(rabbit_url, dlq)
            assert dead.message_id == str(event.event_id)
            headers = dead.headers or {}
            assert headers[REASON_HEADER] == "delivery_limit"
            assert headers[DELIVERIES_HEADER] == limit + 1
            assert await service.rows("label_requests", project) == 0
    finally:
        await proxy.stop()


async def test_bad_queue_requests_name_the_field(service: Service) -> None:
    project = await service.create_project()

    # Let the relay publish project.configured before the service stops: stopping the relay
    # just as an event wakes it can lose the cancellation on Python 3.11 (asyncio.wait_for).
    async def configured() -> bool:
        return bool(service.probe.configured(project))

    await wait_for(configured, message="project.configured")
    base = f"/v1/projects/{project}/label-requests"
    cursor = base64.urlsafe_b64encode(b"q1:oops").decode()

    responses = {
        "status": await service.client.get(base, params={"status": "x"}, headers=service.headers),
        "cursor": await service.client.get(
            base, params={"cursor": cursor}, headers=service.headers
        ),
        "input_sha256": await service.client.post(f"{base}/abc:dismiss", headers=service.headers),
    }

    for field, response in responses.items():
        assert response.status_code == 422, response.text
        assert response.json()["error"]["details"]["field"] == field
