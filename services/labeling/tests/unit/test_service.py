import asyncio
import hashlib
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from flywheel_contracts import LabelsSavedV1, ProjectConfiguredV1
from flywheel_contracts.datasets import image_key
from flywheel_contracts.events import RetrainPolicy, TaskType
from flywheel_labeling.errors import (
    FieldError,
    ImageNotFoundError,
    ImageSourceRefusedError,
    InvalidCursorError,
    ProjectExistsError,
    ProjectNotFoundError,
    TaskTypeNotSupportedError,
    UnknownClassError,
)
from flywheel_labeling.labelstudio import parse_webhook
from flywheel_labeling.ports import (
    AnnotationRef,
    AnnotationVersion,
    Change,
    CommitResult,
    DeleteAnnotation,
    LabelContent,
    LabelFields,
    NewProject,
    Outcome,
    Project,
    ProjectChanges,
    Upsert,
)
from flywheel_labeling.service import (
    GroupCommitter,
    LabelingService,
    LabelRequest,
    Limits,
    ProjectService,
    decode_cursor,
    encode_cursor,
    plan_group,
)
from flywheel_runtime.errors import DependencyUnavailableError
from flywheel_testing.wait import wait_for

from ..conftest import digit_image
from ..fakes import FakeFetcher, FakeImages, FakeSnapshots, FakeStore
from ..labelstudio_payloads import annotation, created, deleted, task

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
DIGITS = [str(d) for d in range(10)]


def _project(**update: object) -> Project:
    return Project(
        project_id="digits",
        name="Digits",
        task_type=TaskType.CLASSIFICATION,
        class_names=DIGITS,
        model_line="digits-classifier",
        policy=RetrainPolicy(),
        revision=1,
        created_at=NOW,
        updated_at=NOW,
    ).model_copy(update=update)


def _sha(i: int) -> str:
    return hashlib.sha256(f"image-{i}".encode()).hexdigest()


def _upsert(index: int, image: int, class_name: str, **content: object) -> Upsert:
    return Upsert(
        index=index,
        image_sha256=_sha(image),
        image_key=image_key(_sha(image)),
        content=LabelContent(class_name=class_name, **content),  # type: ignore[arg-type]
        labeler="alice",
    )


# --- cursors ------------------------------------------------------------------------------------


def test_a_cursor_round_trips_and_is_opaque() -> None:
    cursor = encode_cursor(4711)

    assert decode_cursor(cursor) == 4711
    assert "4711" not in cursor
    assert decode_cursor(None) is None
    assert decode_cursor("") is None


@pytest.mark.parametrize("cursor", ["garbage!", "djE6LTE", "eDoxMg", "djE6YWJj"])
def test_a_cursor_we_did_not_issue_is_refused_naming_the_field(cursor: str) -> None:
    with pytest.raises(InvalidCursorError) as raised:
        decode_cursor(cursor)

    assert raised.value.details["field"] == "cursor"


# --- planning -----------------------------------------------------------------------------------


def test_plan_creates_updates_and_leaves_identical_labels_alone() -> None:
    first = plan_group(
        _project(), [[_upsert(0, 1, "7"), _upsert(1, 2, "3")]], labels={}, refs={}, now=NOW
    )
    existing = {label.image_sha256: label for label in first.upserts}

    second = plan_group(
        _project(class_counts=first.class_counts),
        [[_upsert(0, 1, "7"), _upsert(1, 2, "8")]],
        labels=existing,
        refs={},
        now=NOW,
    )

    assert [o.status for o in first.outcomes[0]] == ["created", "created"]
    assert first.class_counts == {"3": 1, "7": 1}
    assert [o.status for o in second.outcomes[0]] == ["unchanged", "updated"]
    [updated] = second.upserts
    assert (updated.content.class_name, updated.revision) == ("8", 2)
    assert updated.label_id == existing[_sha(2)].label_id
    assert [(s.label.revision, s.reason) for s in second.superseded] == [(1, "updated")]
    assert second.class_counts == {"7": 1, "8": 1}
    assert second.deletes == []


def test_plan_applies_requests_in_order_within_a_group() -> None:
    plan = plan_group(
        _project(),
        [[_upsert(0, 1, "7")], [_upsert(0, 1, "1")], [_upsert(0, 1, "1")]],
        labels={},
        refs={},
        now=NOW,
    )

    assert [r[0].status for r in plan.outcomes] == ["created", "updated", "unchanged"]
    [label] = plan.upserts
    assert (label.content.class_name, label.revision) == ("1", 2)
    assert plan.class_counts == {"1": 1}


def test_plan_ignores_label_studio_versions_it_has_seen_or_outgrown() -> None:
    seen = AnnotationRef("digits", 17, NOW, uuid.uuid4(), _sha(1))
    same = replace_annotation(_upsert(0, 1, "1"), 17, NOW)
    older = replace_annotation(_upsert(1, 1, "2"), 17, NOW - timedelta(minutes=1))
    newer = replace_annotation(_upsert(2, 2, "3"), 17, NOW + timedelta(minutes=1))

    plan = plan_group(_project(), [[same, older, newer]], labels={}, refs={17: seen}, now=NOW)

    assert [o.status for o in plan.outcomes[0]] == ["unchanged", "ignored", "created"]
    [ref] = plan.refs
    assert (ref.updated_at, ref.image_sha256) == (NOW + timedelta(minutes=1), _sha(2))


def replace_annotation(change: Upsert, annotation_id: int, updated_at: datetime) -> Upsert:
    version = AnnotationVersion(annotation_id, updated_at)
    return Upsert(
        index=change.index,
        image_sha256=change.image_sha256,
        image_key=change.image_key,
        content=change.content,
        labeler=change.labeler,
        external_id=version.external_id,
        annotation=version,
    )


def test_plan_deletes_an_annotations_label_only_while_it_is_still_that_annotations() -> None:
    created_plan = plan_group(
        _project(),
        [[replace_annotation(_upsert(0, 1, "7"), 17, NOW), _upsert(1, 2, "5")]],
        labels={},
        refs={},
        now=NOW,
    )
    labels = {label.image_sha256: label for label in created_plan.upserts}
    refs = {ref.annotation_id: ref for ref in created_plan.refs}
    refs[18] = AnnotationRef("digits", 18, NOW, labels[_sha(2)].label_id, _sha(2))

    plan = plan_group(
        _project(class_counts=created_plan.class_counts),
        [[DeleteAnnotation(0, 17), DeleteAnnotation(1, 18), DeleteAnnotation(2, 99)]],
        labels=labels,
        refs=refs,
        now=NOW,
    )

    assert [o.status for o in plan.outcomes[0]] == ["deleted", "unchanged", "unchanged"]
    assert plan.deletes == [labels[_sha(1)].label_id]
    assert plan.class_counts == {"5": 1}
    assert all(ref.deleted for ref in plan.refs)
    assert plan.live_labels == {_sha(2): labels[_sha(2)].label_id}


def test_a_group_plan_knows_the_live_label_of_every_image_it_touched() -> None:
    first = plan_group(_project(), [[_upsert(0, 1, "7")]], labels={}, refs={}, now=NOW)
    [label] = first.upserts

    again = plan_group(
        _project(class_counts=first.class_counts),
        [[_upsert(0, 1, "7"), _upsert(1, 2, "3")]],
        labels={label.image_sha256: label},
        refs={},
        now=NOW,
    )

    assert first.live_labels == {_sha(1): label.label_id}
    assert [o.status for o in again.outcomes[0]] == ["unchanged", "created"]
    assert again.live_labels == {
        _sha(1): label.label_id,
        _sha(2): again.outcomes[0][1].label_id,
    }


# --- group commit -------------------------------------------------------------------------------


class RecordingCommit:
    """A commit function that holds its first group until released and records every group."""

    def __init__(self) -> None:
        self.groups: list[list[list[Change]]] = []
        self.projects: list[str] = []
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.failing: set[int] = set()
        self.outage = False

    async def __call__(self, project_id: str, requests: list[list[Change]]) -> list[CommitResult]:
        self.groups.append(requests)
        self.projects.append(project_id)
        number = len(self.groups)
        if number == 1:
            self.entered.set()
            await self.release.wait()
        if self.outage:
            raise DependencyUnavailableError("database unavailable")
        if any(c.index in self.failing for r in requests for c in r):
            raise RuntimeError("constraint violated")
        snapshot = f"snap-{number}"
        return [
            CommitResult([Outcome(c.index, "created") for c in r], snapshot_id=snapshot)
            for r in requests
        ]


async def _queued(
    committer: GroupCommitter, requests: list[list[Change]], project_id: str = "digits"
) -> list[asyncio.Task[CommitResult]]:
    """Submit each request from its own task; return once every one is queued."""
    started: list[int] = []

    async def submit(changes: list[Change]) -> CommitResult:
        started.append(len(started))  # submit() queues before its first await
        return await committer.submit(project_id, changes)

    tasks = [asyncio.create_task(submit(r)) for r in requests]

    async def all_queued() -> bool:
        return len(started) == len(tasks)

    await wait_for(all_queued, message="requests queued")
    return tasks


async def test_requests_waiting_behind_a_commit_are_committed_together() -> None:
    commit = RecordingCommit()
    committer = GroupCommitter(commit, max_items=100, linger_s=0)

    first = asyncio.create_task(committer.submit("digits", [_upsert(0, 1, "7")]))
    await commit.entered.wait()
    rest = await _queued(committer, [[_upsert(i, i, "7")] for i in range(1, 6)])
    commit.release.set()
    results = await asyncio.gather(first, *rest)

    assert [len(g) for g in commit.groups] == [1, 5]
    assert [r.snapshot_id for r in results] == ["snap-1"] + ["snap-2"] * 5
    assert [r.outcomes[0].index for r in results] == [0, 1, 2, 3, 4, 5]


async def test_a_group_holds_at_most_max_items_changes() -> None:
    commit = RecordingCommit()
    committer = GroupCommitter(commit, max_items=4, linger_s=0)

    first = asyncio.create_task(committer.submit("digits", [_upsert(0, 0, "1")]))
    await commit.entered.wait()
    rest = await _queued(committer, [[_upsert(i, i, "1"), _upsert(i, i, "2")] for i in range(1, 6)])
    commit.release.set()
    await asyncio.gather(first, *rest)

    assert [sum(len(r) for r in g) for g in commit.groups] == [1, 4, 4, 2]


async def test_a_failing_request_is_retried_alone_and_fails_only_itself() -> None:
    commit = RecordingCommit()
    commit.failing = {3}
    committer = GroupCommitter(commit, max_items=100, linger_s=0)

    first = asyncio.create_task(committer.submit("digits", [_upsert(0, 0, "1")]))
    await commit.entered.wait()
    others = await _queued(committer, [[_upsert(i, i, "1")] for i in range(1, 5)])
    commit.release.set()
    results = await asyncio.gather(first, *others, return_exceptions=True)

    assert isinstance(results[3], RuntimeError)
    assert all(isinstance(r, CommitResult) for i, r in enumerate(results) if i != 3)
    assert [len(g) for g in commit.groups] == [1, 4, 1, 1, 1, 1]


async def test_an_outage_fails_the_whole_group_at_once() -> None:
    commit = RecordingCommit()
    commit.outage = True
    committer = GroupCommitter(commit, max_items=100, linger_s=0)

    first = asyncio.create_task(committer.submit("digits", [_upsert(0, 0, "1")]))
    await commit.entered.wait()
    others = await _queued(committer, [[_upsert(i, i, "1")] for i in range(1, 4)])
    commit.release.set()
    results = await asyncio.gather(first, *others, return_exceptions=True)

    assert all(isinstance(r, DependencyUnavailableError) for r in results)
    assert len(commit.groups) == 2


async def test_lingering_gathers_requests_that_arrive_just_after() -> None:
    commit = RecordingCommit()
    commit.release.set()
    committer = GroupCommitter(commit, max_items=3, linger_s=5)

    results = await asyncio.gather(
        *(committer.submit("digits", [_upsert(i, i, "1")]) for i in range(3))
    )

    assert [len(g) for g in commit.groups] == [3]
    assert {r.snapshot_id for r in results} == {"snap-1"}


async def test_projects_commit_independently_and_close_waits_for_queued_groups() -> None:
    commit = RecordingCommit()
    committer = GroupCommitter(commit, max_items=100, linger_s=0)

    held = asyncio.create_task(committer.submit("digits", [_upsert(0, 0, "1")]))
    await commit.entered.wait()
    other = await committer.submit("letters", [_upsert(0, 0, "a")])
    closing = asyncio.create_task(committer.close())
    [queued_after_close] = await _queued(committer, [[_upsert(1, 1, "1")]])
    assert not closing.done()
    commit.release.set()
    await closing

    assert commit.projects == ["digits", "letters"]
    assert other.snapshot_id == "snap-2"
    assert held.result().snapshot_id == "snap-1"
    with pytest.raises(DependencyUnavailableError, match="shutting down"):
        await queued_after_close


# --- the use cases on fake ports ----------------------------------------------------------------


class World:
    def __init__(self) -> None:
        self.store = FakeStore()
        self.images = FakeImages()
        self.fetcher = FakeFetcher()
        self.snapshots = FakeSnapshots()
        self.projects = ProjectService(self.store)
        self.labeling = LabelingService(
            self.store,
            self.images,
            self.fetcher,
            self.snapshots,
            Limits(max_image_bytes=100_000, max_image_pixels=1_000_000),
            group_linger_s=0,
        )

    def events(self, kind: type[LabelsSavedV1] = LabelsSavedV1) -> list[LabelsSavedV1]:
        return [e for e in self.store.state.outbox if isinstance(e, kind)]


def _request(
    index: int, image: bytes | str, class_name: str = "7", **fields: object
) -> LabelRequest:
    return LabelRequest(
        index=index,
        fields=LabelFields(class_name=class_name, **fields),  # type: ignore[arg-type]
        image=image,
        image_field=f"items.{index}.image",
        class_field=f"items.{index}.class_name",
        labeler="alice",
    )


@pytest.fixture
async def world() -> World:
    built = World()
    await built.projects.create(NewProject(project_id="digits", name="Digits", class_names=DIGITS))
    return built


async def test_creating_a_project_announces_it(world: World) -> None:
    [event] = [e for e in world.store.state.outbox if isinstance(e, ProjectConfiguredV1)]

    assert event.payload.model_line == "digits-classifier"
    assert event.payload.revision == 1
    with pytest.raises(ProjectExistsError):
        await world.projects.create(NewProject(project_id="digits", name="x", class_names=["a"]))


async def test_detection_projects_are_refused_at_creation() -> None:
    service = ProjectService(FakeStore())

    with pytest.raises(TaskTypeNotSupportedError) as raised:
        await service.create(
            NewProject(
                project_id="boxes", name="b", task_type=TaskType.DETECTION, class_names=["car"]
            )
        )

    assert raised.value.details["field"] == "task_type"


async def test_classes_are_only_added_and_each_change_is_a_new_revision(world: World) -> None:
    updated = await world.projects.update("digits", ProjectChanges(class_names=["x", *DIGITS]))
    same = await world.projects.update("digits", ProjectChanges(class_names=[*DIGITS, "x"]))

    assert updated.class_names == [*DIGITS, "x"]
    assert (updated.revision, same.revision) == (2, 2)
    assert [e.payload.revision for e in world.events(ProjectConfiguredV1)] == [1, 2]  # type: ignore[arg-type]
    with pytest.raises(FieldError, match="'3'") as raised:
        await world.projects.update("digits", ProjectChanges(class_names=["0", "1"]))
    assert raised.value.details["field"] == "class_names"
    with pytest.raises(ProjectNotFoundError):
        await world.projects.update("nope", ProjectChanges(name="x"))


async def test_saved_labels_land_in_one_snapshot_with_their_counts(world: World) -> None:
    result = await world.labeling.save(
        "digits",
        [
            _request(0, digit_image(1), "7", prediction_id="p1", predicted_class="1"),
            _request(1, digit_image(2), "3", prediction_id="p2", predicted_class="3"),
            _request(2, digit_image(3), "5"),
            _request(
                3,
                digit_image(4),
                "4",
                source="pseudo",
                prediction_id="p3",
                predicted_class="4",
                model_version="2",
                confidence=0.9,
            ),
        ],
    )

    assert [i.status for i in result.items] == ["created"] * 4
    [event] = world.events()
    assert event.payload.snapshot_id == result.snapshot_id
    assert (event.payload.prefilled_count, event.payload.corrected_count) == (2, 1)
    feedback = sorted(event.payload.feedback, key=lambda f: f.prediction_id or "")
    assert [(f.prediction_id, f.predicted_class, f.class_name, f.corrected) for f in feedback] == [
        ("p1", "1", "7", True),
        ("p2", "3", "3", False),
    ]
    assert event.payload.snapshot_sequence == 1
    assert sorted(event.payload.label_ids) == sorted(i.label_id for i in result.items)  # type: ignore[type-var]
    assert len(world.images.objects) == 4
    manifest = await world.snapshots.resolve("digits", event.payload.snapshot_id)
    assert manifest.class_counts() == {"3": 1, "4": 1, "5": 1, "7": 1}
    assert world.store.state.projects["digits"].head_snapshot_id == result.snapshot_id


async def test_replaying_the_same_labels_changes_nothing(world: World) -> None:
    requests = [_request(0, digit_image(1), "7"), _request(1, digit_image(2), "3")]
    first = await world.labeling.save("digits", requests)

    again = await world.labeling.save("digits", requests)

    assert [i.status for i in again.items] == ["unchanged", "unchanged"]
    assert [i.label_id for i in again.items] == [i.label_id for i in first.items]
    assert again.snapshot_id is None
    assert len(world.events()) == 1
    assert len(world.store.state.snapshots) == 1


async def test_a_bad_item_is_rejected_while_the_others_are_saved(world: World) -> None:
    result = await world.labeling.save(
        "digits",
        [
            _request(0, digit_image(1), "7"),
            _request(1, digit_image(2), "cat"),
            _request(2, b"not an image"),
        ],
    )

    assert [i.status for i in result.items] == ["created", "rejected", "rejected"]
    assert isinstance(result.items[1].error, UnknownClassError)
    assert result.items[1].error.details["field"] == "items.1.class_name"
    assert result.items[2].error is not None
    assert result.items[2].error.details["field"] == "items.2.image"
    assert len(world.images.objects) == 1
    assert len(world.store.state.labels) == 1


async def test_a_class_added_meanwhile_is_accepted_without_waiting_for_the_cache(
    world: World,
) -> None:
    await world.labeling.save("digits", [_request(0, digit_image(1), "7")])
    await world.projects.update("digits", ProjectChanges(class_names=[*DIGITS, "x"]))

    result = await world.labeling.save("digits", [_request(0, digit_image(2), "x")])

    assert result.items[0].status == "created"


async def test_labels_for_an_unknown_project_are_404() -> None:
    service = World().labeling

    with pytest.raises(ProjectNotFoundError):
        await service.save("nope", [_request(0, digit_image(1))])


async def test_s3_references_must_be_in_the_data_bucket_and_exist(world: World) -> None:
    world.images.objects["uploads/a.png"] = digit_image(9)

    result = await world.labeling.save(
        "digits",
        [
            _request(0, "s3://flywheel-data/uploads/a.png"),
            _request(1, "s3://other-bucket/uploads/a.png"),
            _request(2, "s3://flywheel-data/uploads/missing.png"),
            _request(3, "http://images.example.com/a.png"),
        ],
    )

    assert [i.status for i in result.items] == ["created", "rejected", "rejected", "rejected"]
    assert isinstance(result.items[1].error, ImageSourceRefusedError)
    assert isinstance(result.items[2].error, ImageNotFoundError)
    assert isinstance(result.items[3].error, ImageSourceRefusedError)


async def test_a_failed_segment_write_commits_nothing(world: World) -> None:
    world.snapshots.down = True

    with pytest.raises(DependencyUnavailableError):
        await world.labeling.save("digits", [_request(0, digit_image(1))])

    assert world.store.state.labels == {}
    assert world.events() == []


async def test_an_unreachable_database_fails_the_request(world: World) -> None:
    world.store.down = True
    fresh = LabelingService(  # a fresh cache: the project must be read
        world.store,
        world.images,
        world.fetcher,
        world.snapshots,
        Limits(max_image_bytes=100_000, max_image_pixels=1_000_000),
    )

    with pytest.raises(DependencyUnavailableError):
        await fresh.save("digits", [_request(0, digit_image(1))])


async def test_label_studio_creates_updates_ignores_and_deletes(world: World) -> None:
    world.fetcher.urls["http://img.test/1.png"] = digit_image(1)
    tsk = task(5, "http://img.test/1.png")
    later = "2026-01-01T11:00:00Z"

    made = await world.labeling.apply_webhook(
        "digits", parse_webhook(created(annotation(17, 5, ["7"]), tsk))
    )
    again = await world.labeling.apply_webhook(
        "digits", parse_webhook(created(annotation(17, 5, ["7"]), tsk))
    )
    changed = await world.labeling.apply_webhook(
        "digits",
        parse_webhook(
            created(annotation(17, 5, ["1"], updated_at=later), None, "ANNOTATION_UPDATED")
        ),
    )
    stale = await world.labeling.apply_webhook(
        "digits", parse_webhook(created(annotation(17, 5, ["3"]), tsk))
    )
    skipped = await world.labeling.apply_webhook(
        "digits", parse_webhook(created(annotation(18, 6, [], was_cancelled=True), tsk))
    )
    gone = await world.labeling.apply_webhook("digits", parse_webhook(deleted(17)))

    assert [r.items[0].status for r in (made, again, changed, stale, skipped, gone)] == [
        "created",
        "unchanged",
        "updated",
        "ignored",
        "ignored",
        "deleted",
    ]
    assert world.store.state.labels == {}
    assert len(world.events()) == 3
    before_delete = await world.snapshots.resolve("digits", changed.snapshot_id or "")
    assert [e.class_name for e in before_delete.entries] == ["1"]
    assert world.events()[-1].payload.deleted_label_ids == [made.items[0].label_id]


async def test_a_single_annotation_with_an_unknown_class_fails_the_webhook(world: World) -> None:
    world.fetcher.urls["http://img.test/1.png"] = digit_image(1)

    with pytest.raises(UnknownClassError) as raised:
        await world.labeling.apply_webhook(
            "digits",
            parse_webhook(created(annotation(17, 5, ["cat"]), task(5, "http://img.test/1.png"))),
        )

    assert raised.value.details["field"] == "annotation.result"
    assert world.store.state.labels == {}
