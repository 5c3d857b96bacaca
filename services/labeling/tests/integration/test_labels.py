import asyncio
import base64
import io
import uuid

import pytest

from flywheel_contracts.datasets import image_key
from flywheel_testing.wait import wait_for

from .conftest import Service

pytestmark = pytest.mark.integration


async def test_a_single_label_is_stored_and_its_snapshot_announced(service: Service, image) -> None:
    project = await service.create_project()
    data = image(1)

    response = await service.post_label(
        project, data, "7", prediction_id="p-1", predicted_class="1"
    )

    assert response.status_code == 201, response.text
    body = response.json()
    label_id = uuid.UUID(body["label_id"])
    [event] = await service.probe.wait_labels_saved(project)
    assert event.payload.label_ids == [label_id]
    assert event.payload.snapshot_id == body["snapshot_id"]
    assert (event.payload.prefilled_count, event.payload.corrected_count) == (1, 1)
    assert await service.label_ids(project) == {label_id}
    assert await service.objects("images/") == [image_key(body["image_sha256"])]
    manifest = await service.snapshot(project, event.payload.snapshot_id)
    assert [(e["label_id"], e["class_name"]) for e in manifest["entries"]] == [(str(label_id), "7")]


async def test_a_batch_stores_every_item_under_one_snapshot(service: Service, image) -> None:
    project = await service.create_project()
    uploaded = image(10)
    await asyncio.to_thread(
        service.s3.put_object,
        service.settings.data_bucket,
        "uploads/ten.png",
        io.BytesIO(uploaded),
        len(uploaded),
    )
    items = [
        {"image_base64": base64.b64encode(image(i)).decode(), "class_name": str(i)}
        for i in range(3)
    ] + [
        {
            "image_uri": f"s3://{service.settings.data_bucket}/uploads/ten.png",
            "class_name": "9",
            "source": "pseudo",
            "model_version": "3",
            "confidence": 0.97,
            "external_id": "tool-42",
        }
    ]

    response = await service.client.post(
        f"/v1/projects/{project}/labels:batch", json={"items": items}, headers=service.headers
    )

    assert response.status_code == 200, response.text
    results = response.json()["items"]
    assert [r["status"] for r in results] == ["created"] * 4
    [event] = await service.probe.wait_labels_saved(project)
    assert event.payload.source == "mixed"
    assert {str(i) for i in event.payload.label_ids} == {r["label_id"] for r in results}
    assert await service.rows("labels", project) == 4
    assert len(await service.objects("images/")) == 4
    manifest = await service.snapshot(project, event.payload.snapshot_id)
    assert manifest["class_counts"] == {"0": 1, "1": 1, "2": 1, "9": 1}
    pseudo = next(e for e in manifest["entries"] if e["class_name"] == "9")
    assert (pseudo["source"], pseudo["model_version"], pseudo["confidence"]) == (
        "pseudo",
        "3",
        0.97,
    )


async def test_concurrent_labels_are_all_stored_announced_and_grouped(
    service: Service, image
) -> None:
    project = await service.create_project()
    images = [image(1000 + i) for i in range(200)]
    pending = list(enumerate(images))
    responses: dict[int, dict[str, str]] = {}

    async def client() -> None:
        while pending:
            index, data = pending.pop()
            response = await service.post_label(project, data, str(index % 10))
            assert response.status_code == 201, response.text
            responses[index] = response.json()

    await asyncio.gather(*(client() for _ in range(32)))

    label_ids = {uuid.UUID(r["label_id"]) for r in responses.values()}
    assert len(label_ids) == 200
    assert await service.label_ids(project) == label_ids
    keys = await service.objects("images/")
    assert keys == sorted(image_key(r["image_sha256"]) for r in responses.values())

    snapshots = {r["snapshot_id"] for r in responses.values()}

    async def all_announced() -> bool:
        events = service.probe.labels_saved(project)
        announced = {label for e in events for label in e.payload.label_ids}
        return announced == label_ids

    await wait_for(all_announced, timeout=20, message="every label announced")
    events = service.probe.labels_saved(project)
    assert len(events) == len(snapshots) < 200
    assert sorted(e.payload.snapshot_sequence or 0 for e in events) == list(
        range(1, len(events) + 1)
    )
    head = max(events, key=lambda e: e.payload.snapshot_sequence or 0)
    manifest = await service.snapshot(project, head.payload.snapshot_id)
    assert {uuid.UUID(e["label_id"]) for e in manifest["entries"]} == label_ids


async def test_replaying_the_same_labels_duplicates_nothing_and_announces_nothing(
    service: Service, image
) -> None:
    project = await service.create_project()
    items = [
        {"image_base64": base64.b64encode(image(i)).decode(), "class_name": str(i)}
        for i in range(5)
    ]
    first = await service.client.post(
        f"/v1/projects/{project}/labels:batch", json={"items": items}, headers=service.headers
    )
    single = await service.post_label(project, image(7), "7")
    await service.probe.wait_labels_saved(project, count=2)
    rows, objects, before = (
        await service.rows("labels", project),
        await service.objects(),
        len(service.probe.labels_saved(project)),
    )

    replayed = await service.client.post(
        f"/v1/projects/{project}/labels:batch", json={"items": items}, headers=service.headers
    )
    replayed_single = await service.post_label(project, image(7), "7")

    assert [r["status"] for r in replayed.json()["items"]] == ["unchanged"] * 5
    assert [r["label_id"] for r in replayed.json()["items"]] == [
        r["label_id"] for r in first.json()["items"]
    ]
    assert replayed_single.status_code == 200
    assert replayed_single.json()["label_id"] == single.json()["label_id"]
    assert await service.rows("labels", project) == rows
    assert await service.rows("label_history", project) == 0
    assert await service.objects() == objects
    [only_marker] = await service.events_since(project, before, image(99))
    assert len(only_marker.payload.label_ids) == 1


async def test_a_changed_label_is_a_new_revision_with_history(service: Service, image) -> None:
    project = await service.create_project()
    first = (await service.post_label(project, image(1), "7")).json()

    second = await service.post_label(project, image(1), "1")

    assert second.status_code == 200
    assert (second.json()["status"], second.json()["revision"]) == ("updated", 2)
    assert second.json()["label_id"] == first["label_id"]
    assert await service.rows("labels", project) == 1
    assert await service.rows("label_history", project) == 1
    old = await service.snapshot(project, first["snapshot_id"])
    new = await service.snapshot(project, second.json()["snapshot_id"])
    assert [e["class_name"] for e in old["entries"]] == ["7"]
    assert [(e["class_name"], e["revision"]) for e in new["entries"]] == [("1", 2)]
    stats = (
        await service.client.get(f"/v1/projects/{project}/stats", headers=service.headers)
    ).json()
    assert (stats["total"], stats["snapshots"], stats["head_sequence"]) == (1, 2, 2)
