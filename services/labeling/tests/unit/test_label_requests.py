import base64
import hashlib
import math
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from flywheel_contracts import LabelsRequestedV1
from flywheel_contracts.datasets import image_key
from flywheel_labeling.errors import (
    InvalidCursorError,
    InvalidLabelsRequestedError,
    LabelRequestClosedError,
    LabelRequestNotFoundError,
    ProjectNotFoundError,
    RequestedImageMissingError,
)
from flywheel_labeling.ports import LabelFields, NewProject, QueuePosition, RequestedImage
from flywheel_labeling.service import (
    LabelingService,
    LabelRequest,
    LabelRequestQueue,
    Limits,
    ProjectService,
    decode_queue_cursor,
    encode_queue_cursor,
    requested_images,
)

from ..conftest import digit_image
from ..fakes import FakeFetcher, FakeImages, FakeSnapshots, FakeStore

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
DIGITS = [str(d) for d in range(10)]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def item(
    image: bytes | int | str, score: float, predicted: str | None = "8", **extra: Any
) -> dict[str, Any]:
    """One requested image, named by its bytes, its sha256, or a number standing for one."""
    if isinstance(image, bytes):
        digest = sha(image)
    elif isinstance(image, int):
        digest = hashlib.sha256(str(image).encode()).hexdigest()
    else:
        digest = image
    return {
        "input_sha256": digest,
        "image_key": image_key(digest),
        "score": score,
        "predicted_class": predicted,
        "confidence": 0.4,
    } | extra


def requested(
    *items: dict[str, Any],
    project: str = "digits",
    at: datetime = NOW,
    request_id: uuid.UUID | None = None,
) -> LabelsRequestedV1:
    return LabelsRequestedV1.model_validate(
        {
            "occurred_at": at,
            "payload": {
                "project_id": project,
                "model_line": f"{project}-classifier",
                "request_id": request_id or uuid.uuid4(),
                "reason": "drift",
                "report_id": uuid.uuid4(),
                "items": list(items),
            },
        }
    )


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


class World:
    def __init__(self) -> None:
        self.store = FakeStore()
        self.images = FakeImages()
        self.projects = ProjectService(self.store)
        self.labeling = LabelingService(
            self.store,
            self.images,
            FakeFetcher(),
            FakeSnapshots(),
            Limits(max_image_bytes=100_000, max_image_pixels=1_000_000),
            group_linger_s=0,
        )
        self.queue = LabelRequestQueue(self.store, self.images, clock=Clock())

    def served(self, data: bytes) -> str:
        """Store an input image where serving leaves it; returns its sha256."""
        self.images.objects[image_key(sha(data))] = data
        return sha(data)

    def entries(self, project: str = "digits") -> list[RequestedImage]:
        return sorted(
            (e for e in self.store.state.requests.values() if e.project_id == project),
            key=lambda e: e.entry_id,
        )

    async def open_queue(self, project: str = "digits") -> list[RequestedImage]:
        page, _ = await self.queue.page(project, "open", None, 500)
        return page

    async def label(self, data: bytes, class_name: str = "7", project: str = "digits") -> Any:
        result = await self.labeling.save(
            project,
            [
                LabelRequest(
                    index=0,
                    fields=LabelFields(class_name=class_name),
                    image=data,
                    image_field="image",
                    class_field="class_name",
                    labeler="alice",
                )
            ],
        )
        return result.items[0]


@pytest.fixture
async def world() -> World:
    built = World()
    await built.projects.create(NewProject(project_id="digits", name="Digits", class_names=DIGITS))
    return built


# --- reading the event (pure) -------------------------------------------------------------------


def test_each_image_is_kept_once_with_its_highest_scored_item() -> None:
    event = requested(item(1, 0.2, "1"), item(2, 0.9), item(1, 0.7, "7"), item(1, 0.5, "5"))

    images = requested_images(event, NOW)

    assert [(i.input_sha256, i.score, i.predicted_class) for i in images] == sorted(
        [(item(1, 0)["input_sha256"], 0.7, "7"), (item(2, 0)["input_sha256"], 0.9, "8")]
    )
    assert {i.request_id for i in images} == {event.payload.request_id}
    assert {i.requested_at for i in images} == {NOW}


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"score": math.nan}, "payload.items.1.score"),
        ({"score": math.inf}, "payload.items.1.score"),
        ({"image_key": ""}, "payload.items.1.image_key"),
        ({"image_key": "k" * 1025}, "payload.items.1.image_key"),
        ({"image_key": "images/\x00"}, "payload.items.1.image_key"),
        ({"predicted_class": "8\x00"}, "payload.items.1.predicted_class"),
    ],
)
def test_an_item_the_queue_cannot_hold_is_refused_naming_its_field(
    bad: dict[str, Any], field: str
) -> None:
    event = requested(item(1, 0.5), item(2, 0.5) | bad)

    with pytest.raises(InvalidLabelsRequestedError) as raised:
        requested_images(event, NOW)

    assert raised.value.details["field"] == field
    assert raised.value.http_status == 422
    assert not raised.value.retryable


def test_a_queue_cursor_round_trips_and_is_opaque() -> None:
    position = QueuePosition(score=0.1 + 0.2, created_at=NOW, entry_id=42)

    cursor = encode_queue_cursor(position)

    assert decode_queue_cursor(cursor) == position
    assert "42" not in cursor
    assert decode_queue_cursor(None) is None
    assert decode_queue_cursor("") is None


@pytest.mark.parametrize(
    "raw",
    [
        "garbage",
        "q1:0.5|2026-01-01T12:00:00|1",
        "q1:nan|2026-01-01T12:00:00+00:00|1",
        "q1:0.5|2026-01-01T12:00:00+00:00",
        "q1:0.5|2026-01-01T12:00:00+00:00|-1",
        "v1:12",
    ],
)
def test_a_queue_cursor_we_did_not_issue_is_refused_naming_the_field(raw: str) -> None:
    cursor = base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    with pytest.raises(InvalidCursorError) as raised:
        decode_queue_cursor(cursor)

    assert raised.value.details["field"] == "cursor"


# --- labels.requested ---------------------------------------------------------------------------


async def test_requested_images_are_listed_by_score_then_age(world: World) -> None:
    await world.queue.labels_requested(requested(item(1, 0.5), item(2, 0.9)))
    await world.queue.labels_requested(requested(item(3, 0.5), item(4, 0.1)))

    queue = await world.open_queue()

    assert [e.input_sha256 for e in queue] == [item(n, 0)["input_sha256"] for n in (2, 1, 3, 4)]
    assert {e.status for e in queue} == {"open"}
    assert queue[0].image_key == image_key(queue[0].input_sha256)
    assert (queue[0].predicted_class, queue[0].confidence) == ("8", 0.4)


async def test_a_redelivered_request_changes_nothing(world: World) -> None:
    event = requested(item(1, 0.5), item(2, 0.9))
    await world.queue.labels_requested(event)
    before = world.entries()

    await world.queue.labels_requested(event)

    assert world.entries() == before
    assert world.store.state.claimed == {event.event_id}


async def test_a_new_request_for_an_open_image_merges_into_its_one_entry(world: World) -> None:
    first = requested(item(1, 0.9, "1"), at=NOW)
    newer = requested(item(1, 0.3, "3"), at=NOW + timedelta(hours=1))
    older = requested(item(1, 0.2, "2"), at=NOW - timedelta(hours=1))

    for event in (first, newer, older):
        await world.queue.labels_requested(event)

    [entry] = world.entries()
    assert entry.status == "open"
    assert entry.score == 0.9
    assert (entry.request_id, entry.predicted_class) == (newer.payload.request_id, "3")
    assert entry.requested_at == newer.occurred_at


async def test_a_label_saved_for_the_same_bytes_answers_the_request(world: World) -> None:
    wanted, other = digit_image(1), digit_image(2)
    await world.queue.labels_requested(
        requested(item(world.served(wanted), 0.9), item(world.served(other), 0.5))
    )

    saved = await world.label(wanted, "7")

    [labeled] = [e for e in world.entries() if e.status == "labeled"]
    assert labeled.input_sha256 == sha(wanted) == saved.image_sha256
    assert labeled.labeled_label_id == saved.label_id
    assert [e.input_sha256 for e in await world.open_queue()] == [sha(other)]
    page, _ = await world.queue.page("digits", "labeled", None, 10)
    assert [e.input_sha256 for e in page] == [sha(wanted)]


async def test_a_label_in_another_project_leaves_the_request_open(world: World) -> None:
    await world.projects.create(NewProject(project_id="other", name="O", class_names=DIGITS))
    data = digit_image(1)
    await world.queue.labels_requested(requested(item(world.served(data), 0.9)))

    await world.label(data, "7", project="other")

    assert [e.status for e in world.entries()] == ["open"]


async def test_images_labeled_or_dismissed_already_are_not_asked_for_again(world: World) -> None:
    labeled, dismissed, fresh = digit_image(1), digit_image(2), digit_image(3)
    await world.label(labeled, "1")
    await world.queue.labels_requested(requested(item(world.served(dismissed), 0.5)))
    await world.queue.dismiss("digits", sha(dismissed), by="alice")

    await world.queue.labels_requested(
        requested(item(labeled, 0.9), item(dismissed, 0.9), item(world.served(fresh), 0.1))
    )

    assert [e.input_sha256 for e in await world.open_queue()] == [sha(fresh)]
    assert [e.status for e in world.entries()] == ["dismissed", "open"]


async def test_requests_for_an_unknown_project_are_kept_until_it_exists(world: World) -> None:
    await world.queue.labels_requested(requested(item(1, 0.5), project="later"))

    with pytest.raises(ProjectNotFoundError):
        await world.queue.page("later", "open", None, 10)
    await world.projects.create(NewProject(project_id="later", name="L", class_names=DIGITS))
    assert len(await world.open_queue("later")) == 1


async def test_a_refused_request_records_nothing(world: World) -> None:
    event = requested(item(1, 0.5), item(2, math.nan))

    with pytest.raises(InvalidLabelsRequestedError):
        await world.queue.labels_requested(event)

    assert world.entries() == []
    assert world.store.state.claimed == set()


# --- reading, dismissing ------------------------------------------------------------------------


async def test_pages_follow_the_queue_order_without_gaps_or_repeats(world: World) -> None:
    scores = [0.5, 0.9, 0.5, 0.1, 0.9, 0.5, 0.3]
    await world.queue.labels_requested(requested(*(item(n, s) for n, s in enumerate(scores))))
    expected = [e.input_sha256 for e in await world.open_queue()]

    seen: list[str] = []
    cursor: str | None = None
    while True:
        page, cursor = await world.queue.page("digits", "open", cursor, 2)
        seen += [e.input_sha256 for e in page]
        if cursor is None:
            break

    assert seen == expected
    assert [e.score for e in await world.open_queue()] == sorted(scores, reverse=True)


async def test_reading_an_unknown_project_or_a_bad_cursor_is_refused(world: World) -> None:
    with pytest.raises(ProjectNotFoundError):
        await world.queue.page("nope", "open", None, 10)
    with pytest.raises(InvalidCursorError):
        await world.queue.page("digits", "open", "not-a-cursor", 10)


async def test_dismissing_takes_an_image_off_the_queue_once_and_for_all(world: World) -> None:
    await world.queue.labels_requested(requested(item(1, 0.5), item(2, 0.4)))
    target = item(1, 0)["input_sha256"]

    dismissed = await world.queue.dismiss("digits", target, by="alice")
    again = await world.queue.dismiss("digits", target, by="alice")

    assert dismissed.status == again.status == "dismissed"
    assert [e.input_sha256 for e in await world.open_queue()] == [item(2, 0)["input_sha256"]]


async def test_dismissing_an_answered_or_unknown_request_is_refused(world: World) -> None:
    data = digit_image(1)
    await world.queue.labels_requested(requested(item(world.served(data), 0.5)))
    await world.label(data)

    with pytest.raises(LabelRequestClosedError) as closed:
        await world.queue.dismiss("digits", sha(data), by="alice")
    with pytest.raises(LabelRequestNotFoundError):
        await world.queue.dismiss("digits", "0" * 64, by="alice")
    with pytest.raises(ProjectNotFoundError):
        await world.queue.dismiss("nope", sha(data), by="alice")

    assert closed.value.http_status == 409
    assert closed.value.details["status"] == "labeled"


async def test_the_image_of_a_request_is_read_from_the_data_bucket(world: World) -> None:
    data = digit_image(1)
    await world.queue.labels_requested(requested(item(world.served(data), 0.5), item(2, 0.1)))

    image = await world.queue.image("digits", sha(data))

    assert (image.data, image.content_type) == (data, "image/png")
    with pytest.raises(RequestedImageMissingError) as missing:
        await world.queue.image("digits", item(2, 0)["input_sha256"])
    assert missing.value.http_status == 404
    with pytest.raises(LabelRequestNotFoundError):
        await world.queue.image("digits", "0" * 64)
