"""The labeling use cases: projects, labels from every channel, snapshots and their listings.

Every transaction that changes labels creates the project's next snapshot and announces it
with one labels.saved. Requests for the same project are committed in groups by
``GroupCommitter``: each request validates and uploads its images on its own, concurrently with
the others, then hands its label changes over; whatever is waiting is committed as one
snapshot, one S3 segment and one transaction, and every request gets its own outcomes back.

The needs-label queue (``LabelRequestQueue``) holds the images labels.requested asks labelers
to label. A label saved for the same image (the same sha256 of the same bytes) closes its open
entry in the transaction that saves the label.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import re
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Literal

import structlog

from flywheel_contracts import LabelsRequestedV1, LabelsSavedV1, ProjectConfiguredV1
from flywheel_contracts.datasets import (
    SnapshotManifest,
    SnapshotSegment,
    image_key,
    snapshot_id_for,
    split_for,
)
from flywheel_contracts.events import (
    SLUG,
    LabelRequestItem,
    LabelsSavedPayload,
    PredictionFeedback,
    ProjectConfiguredPayload,
    TaskType,
)
from flywheel_labeling.errors import (
    FieldError,
    ImageFetchFailedError,
    ImageNotFoundError,
    ImageSourceRefusedError,
    ImageTooLargeError,
    InvalidCursorError,
    InvalidLabelsRequestedError,
    ItemError,
    LabelRequestClosedError,
    LabelRequestNotFoundError,
    ProjectExistsError,
    ProjectNotFoundError,
    RequestedImageMissingError,
    SnapshotNotFoundError,
    TaskTypeNotSupportedError,
    UnknownClassError,
)
from flywheel_labeling.images import CheckedImage, check_image, media_type
from flywheel_labeling.labelstudio import ItemKind, Webhook, WebhookItem
from flywheel_labeling.ports import (
    AnnotationRef,
    AnnotationVersion,
    Change,
    CommitResult,
    DeleteAnnotation,
    ImageFetcher,
    ImageStore,
    Label,
    LabelContent,
    LabelFields,
    LabelStats,
    NewProject,
    NewRequestedImage,
    Outcome,
    Project,
    ProjectChanges,
    QueuePosition,
    RequestedImage,
    RequestStatus,
    SnapshotRecord,
    SnapshotStorage,
    Status,
    Store,
    Superseded,
    Transaction,
    Upsert,
    label_studio_external_id,
)
from flywheel_runtime.errors import DependencyUnavailableError, NotFoundError

log = structlog.get_logger(__name__)

INLINE_CHECK_BYTES = 256 * 1024
"""Images up to this size are checked on the event loop: a thread hop costs more than decoding
a thumbnail, while a large image must not stall every other request."""


def utcnow() -> datetime:
    return datetime.now(UTC)


# --- cursors ------------------------------------------------------------------------------------

_CURSOR_PREFIX = "v1:"


def encode_cursor(position: int) -> str:
    """An opaque page token for a listing position."""
    raw = f"{_CURSOR_PREFIX}{position}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    """The position in a page token; ``InvalidCursorError`` (422) for anything we did not issue."""
    if cursor is None or cursor == "":
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not raw.startswith(_CURSOR_PREFIX):
            raise ValueError(raw)
        position = int(raw.removeprefix(_CURSOR_PREFIX))
    except (binascii.Error, UnicodeDecodeError, ValueError) as error:
        raise InvalidCursorError("cursor is not one this service issued", field="cursor") from error
    if position < 0:
        raise InvalidCursorError("cursor is not one this service issued", field="cursor")
    return position


# --- planning one group commit (pure) ----------------------------------------------------------


@dataclass
class GroupPlan:
    """What a group of requests does to a project's labels, computed before anything is written.

    Labels carry no snapshot id yet: the id is the hash of exactly these changes.
    """

    outcomes: list[list[Outcome]]
    """Per request, per change, in order."""
    upserts: list[Label]
    """Labels created or given a new revision (their final state in the group)."""
    deletes: list[uuid.UUID]
    """Labels live before the group and gone after it."""
    superseded: list[Superseded]
    refs: list[AnnotationRef]
    class_counts: dict[str, int]
    """Live labels per class after the group."""
    live_labels: dict[str, uuid.UUID] = field(default_factory=dict)
    """The live label after the group of every image the group touched, by sha256: what
    answers the open label requests of those images."""

    @property
    def changed(self) -> bool:
        return bool(self.upserts or self.deletes)


def plan_group(
    project: Project,
    requests: Sequence[Sequence[Change]],
    labels: dict[str, Label],
    refs: dict[int, AnnotationRef],
    now: datetime,
) -> GroupPlan:
    """Apply the requests' changes in order to the current labels of the images they touch.

    ``labels`` holds the live label of every image the changes name (by sha256), ``refs`` the
    last applied version of every Label Studio annotation they name. Later requests see what
    earlier ones did, exactly as if each had been committed on its own.
    """
    state = dict(labels)
    initial = {label.label_id: label for label in labels.values()}
    current_refs = dict(refs)
    touched_refs: dict[int, AnnotationRef] = {}
    superseded: list[Superseded] = []
    changed: set[uuid.UUID] = set()
    outcomes: list[list[Outcome]] = []

    def supersede(label: Label, reason: Literal["updated", "deleted"]) -> None:
        superseded.append(Superseded(label=label, reason=reason, snapshot_id="", at=now))

    for request in requests:
        results: list[Outcome] = []
        for change in request:
            if isinstance(change, DeleteAnnotation):
                ref = current_refs.get(change.annotation_id)
                if ref is None or ref.deleted:
                    results.append(Outcome(change.index, "unchanged"))
                    continue
                label = state.get(ref.image_sha256 or "")
                status: Status = "unchanged"
                if (
                    label is not None
                    and label.label_id == ref.label_id
                    and label.external_id == label_studio_external_id(ref.annotation_id)
                ):
                    supersede(label, "deleted")
                    del state[label.image_sha256]
                    status = "deleted"
                current_refs[ref.annotation_id] = touched_refs[ref.annotation_id] = replace(
                    ref, deleted=True
                )
                results.append(Outcome(change.index, status, ref.label_id, None, ref.image_sha256))
                continue
            if change.annotation is not None:
                ref = current_refs.get(change.annotation.annotation_id)
                if ref is not None and ref.updated_at >= change.annotation.updated_at:
                    seen: Status = (
                        "unchanged" if ref.updated_at == change.annotation.updated_at else "ignored"
                    )
                    results.append(
                        Outcome(change.index, seen, ref.label_id, None, ref.image_sha256)
                    )
                    continue
            label = state.get(change.image_sha256)
            if label is None:
                label = Label(
                    label_id=uuid.uuid4(),
                    project_id=project.project_id,
                    image_sha256=change.image_sha256,
                    image_key=change.image_key,
                    split=split_for(change.image_sha256),
                    content=change.content,
                    labeler=change.labeler,
                    revision=1,
                    external_id=change.external_id,
                    snapshot_id="",
                    created_at=now,
                    updated_at=now,
                )
                status = "created"
            elif label.content == change.content:
                status = "unchanged"
            else:
                supersede(label, "updated")
                label = replace(
                    label,
                    content=change.content,
                    labeler=change.labeler,
                    revision=label.revision + 1,
                    external_id=change.external_id,
                    updated_at=now,
                )
                status = "updated"
            state[change.image_sha256] = label
            if status != "unchanged":
                changed.add(label.label_id)
            if change.annotation is not None:
                annotation_id = change.annotation.annotation_id
                current_refs[annotation_id] = touched_refs[annotation_id] = AnnotationRef(
                    project_id=project.project_id,
                    annotation_id=annotation_id,
                    updated_at=change.annotation.updated_at,
                    label_id=label.label_id,
                    image_sha256=label.image_sha256,
                )
            results.append(
                Outcome(change.index, status, label.label_id, label.revision, label.image_sha256)
            )
        outcomes.append(results)

    final = {label.label_id: label for label in state.values()}
    upserts = sorted(
        (label for label in final.values() if label.label_id in changed),
        key=lambda label: str(label.label_id),
    )
    deletes = sorted(set(initial) - set(final), key=str)
    counts = Counter(project.class_counts)
    for label_id in changed | set(deletes):
        if label_id in initial:
            counts[initial[label_id].content.class_name] -= 1
        if label_id in final:
            counts[final[label_id].content.class_name] += 1
    return GroupPlan(
        outcomes=outcomes,
        upserts=upserts,
        deletes=deletes,
        superseded=superseded,
        refs=list(touched_refs.values()),
        class_counts={name: n for name, n in sorted(counts.items()) if n > 0},
        live_labels={sha: label.label_id for sha, label in sorted(state.items())},
    )


def labels_saved(
    project: Project, plan: GroupPlan, snapshot_id: str, batch_id: uuid.UUID
) -> LabelsSavedV1:
    """The labels.saved announcing a committed group."""
    sources = {label.content.source for label in plan.upserts}
    return LabelsSavedV1(
        payload=LabelsSavedPayload(
            project_id=project.project_id,
            batch_id=batch_id,
            snapshot_id=snapshot_id,
            parent_snapshot_id=project.head_snapshot_id,
            snapshot_sequence=project.head_sequence + 1,
            label_ids=[label.label_id for label in plan.upserts],
            deleted_label_ids=plan.deletes,
            # Pseudo labels carry their prediction too, but only a human can confirm or correct.
            prefilled_count=sum(
                label.content.prefilled and label.content.source == "human"
                for label in plan.upserts
            ),
            corrected_count=sum(
                label.content.corrected and label.content.source == "human"
                for label in plan.upserts
            ),
            source="mixed" if len(sources) > 1 else (sources.pop() if sources else "human"),
            feedback=[
                PredictionFeedback(
                    prediction_id=label.content.prediction_id,
                    model_version=label.content.model_version,
                    predicted_class=label.content.predicted_class,
                    class_name=label.content.class_name,
                    corrected=label.content.corrected,
                )
                for label in plan.upserts
                if label.content.prefilled and label.content.source == "human"
            ],
        )
    )


# --- group commit -------------------------------------------------------------------------------

CommitGroup = Callable[[str, list[list[Change]]], Awaitable[list[CommitResult]]]
"""Commits the changes of several requests of one project at once; one result per request."""


@dataclass
class _Submission:
    changes: list[Change]
    future: asyncio.Future[CommitResult]


@dataclass
class _ProjectQueue:
    pending: deque[_Submission] = field(default_factory=deque)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    worker: asyncio.Task[None] | None = None

    @property
    def size(self) -> int:
        return sum(len(s.changes) for s in self.pending)


class GroupCommitter:
    """Commits concurrent requests of one project together: one snapshot, one transaction.

    A project's requests queue up while its previous group commits; the next group takes
    whatever is waiting (up to ``max_items`` changes, after lingering up to ``linger_s`` for
    more) and commits it with one call of ``commit``. Each request is answered with its own
    outcomes once that commit is done. Projects commit independently of each other.

    An outage (``DependencyUnavailableError``) fails the whole group: nothing was written. Any
    other failure of a group is retried request by request, so one bad request cannot fail
    the others.
    """

    def __init__(self, commit: CommitGroup, *, max_items: int, linger_s: float) -> None:
        self._commit = commit
        self._max_items = max_items
        self._linger_s = linger_s
        self._queues: dict[str, _ProjectQueue] = {}
        self._closed = False

    async def submit(self, project_id: str, changes: list[Change]) -> CommitResult:
        """Commit ``changes`` (in order) with whatever else is waiting; return their outcomes."""
        if not changes:
            return CommitResult(outcomes=[])
        if self._closed:
            raise DependencyUnavailableError("labeling is shutting down", retry_after_s=1)
        future: asyncio.Future[CommitResult] = asyncio.get_running_loop().create_future()
        queue = self._queues.get(project_id)
        if queue is None:
            queue = self._queues[project_id] = _ProjectQueue()
        queue.pending.append(_Submission(changes, future))
        queue.arrived.set()
        if queue.worker is None:
            queue.worker = asyncio.create_task(
                self._run(project_id, queue), name=f"group-commit-{project_id}"
            )
        # Shielded: a client that disconnects must not cancel what its group commits.
        return await asyncio.shield(future)

    async def close(self) -> None:
        """Refuse new requests and wait for the groups already queued to commit."""
        self._closed = True
        workers = [q.worker for q in self._queues.values() if q.worker is not None]
        await asyncio.gather(*workers, return_exceptions=True)

    async def _run(self, project_id: str, queue: _ProjectQueue) -> None:
        try:
            while queue.pending:
                await self._linger(queue)
                group: list[_Submission] = [queue.pending.popleft()]
                taken = len(group[0].changes)
                while queue.pending and taken + len(queue.pending[0].changes) <= self._max_items:
                    taken += len(queue.pending[0].changes)
                    group.append(queue.pending.popleft())
                await self._commit_group(project_id, group)
        finally:
            # Reached with nothing pending and no await since the check, so a request arriving
            # now finds no queue and starts a new worker. Only a cancelled worker (the loop is
            # going away) leaves requests behind; they are told to retry.
            del self._queues[project_id]
            for submission in queue.pending:
                _fail(submission.future, DependencyUnavailableError("labeling is shutting down"))

    async def _linger(self, queue: _ProjectQueue) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._linger_s
        while queue.size < self._max_items:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            queue.arrived.clear()
            try:
                async with asyncio.timeout(remaining):
                    await queue.arrived.wait()
            except TimeoutError:
                return

    async def _commit_group(self, project_id: str, group: list[_Submission]) -> None:
        try:
            results = await self._commit(project_id, [s.changes for s in group])
        except Exception as error:
            if len(group) > 1 and not isinstance(error, DependencyUnavailableError):
                log.warning(
                    "group commit failed; committing its requests one by one",
                    project_id=project_id,
                    requests=len(group),
                    error=repr(error),
                )
                for submission in group:
                    await self._commit_group(project_id, [submission])
                return
            for submission in group:
                _fail(submission.future, error)
            return
        for submission, result in zip(group, results, strict=True):
            if not submission.future.done():
                submission.future.set_result(result)


def _fail(future: asyncio.Future[CommitResult], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
        # Its request may be gone (client disconnected); mark the error as seen either way.
        future.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future[CommitResult]) -> None:
    if not future.cancelled():
        future.exception()


# --- projects -----------------------------------------------------------------------------------


def project_configured(project: Project) -> ProjectConfiguredV1:
    return ProjectConfiguredV1(
        payload=ProjectConfiguredPayload(
            project_id=project.project_id,
            model_line=project.model_line,
            task_type=project.task_type,
            class_names=project.class_names,
            policy=project.policy,
            revision=project.revision,
        )
    )


class ProjectService:
    """Creating and configuring projects; every change emits project.configured."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def create(self, spec: NewProject) -> Project:
        """Create a project (admin); emits project.configured revision 1."""
        if spec.task_type is not TaskType.CLASSIFICATION:
            raise TaskTypeNotSupportedError(
                f"task type {spec.task_type.value!r} is not supported yet; only "
                f"{TaskType.CLASSIFICATION.value!r} projects can be created",
                field="task_type",
            )
        model_line = spec.model_line or f"{spec.project_id}-classifier"
        if not _is_slug(model_line):
            raise FieldError(
                f"the default model line {model_line!r} is too long; set model_line",
                field="model_line",
            )
        now = utcnow()
        project = Project(
            project_id=spec.project_id,
            name=spec.name,
            task_type=spec.task_type,
            class_names=spec.class_names,
            model_line=model_line,
            policy=spec.policy,
            revision=1,
            created_at=now,
            updated_at=now,
        )
        async with self._store.transaction() as tx:
            if not await tx.insert_project(project):
                raise ProjectExistsError(
                    f"project {spec.project_id!r} exists already",
                    details={"project_id": spec.project_id},
                )
            await tx.emit(project_configured(project))
        return project

    async def update(self, project_id: str, changes: ProjectChanges) -> Project:
        """Rename, add classes or change the policy (admin); emits project.configured."""
        async with self._store.transaction() as tx:
            project = await tx.lock_project(project_id)
            if project is None:
                raise ProjectNotFoundError(project_id)
            class_names = project.class_names
            if changes.class_names is not None:
                removed = [c for c in project.class_names if c not in changes.class_names]
                if removed:
                    raise FieldError(
                        "classes can only be added; missing from class_names: "
                        + ", ".join(repr(c) for c in removed),
                        field="class_names",
                        details={"removed": removed},
                    )
                class_names = project.class_names + [
                    c for c in changes.class_names if c not in project.class_names
                ]
            updated = project.model_copy(
                update={
                    "name": changes.name if changes.name is not None else project.name,
                    "class_names": class_names,
                    "policy": changes.policy if changes.policy is not None else project.policy,
                }
            )
            if updated == project:
                return project
            updated = updated.model_copy(
                update={"revision": project.revision + 1, "updated_at": utcnow()}
            )
            await tx.save_project(updated)
            await tx.emit(project_configured(updated))
        return updated

    async def get(self, project_id: str) -> Project:
        project = await self._store.project(project_id)
        if project is None:
            raise ProjectNotFoundError(project_id)
        return project

    async def list_projects(self) -> list[Project]:
        return await self._store.projects()


def _is_slug(value: str) -> bool:
    return re.fullmatch(SLUG, value) is not None


# --- labels -------------------------------------------------------------------------------------


class ProjectCache:
    """Project configurations for validating labels, read at most once per ``ttl_s``.

    Concurrent requests that find the entry stale share one read instead of each sending
    their own. A stale entry can only lack classes added since (classes are never removed),
    and the caller re-reads with ``fresh=True`` before refusing a class it does not know.
    """

    def __init__(self, load: Callable[[str], Awaitable[Project | None]], *, ttl_s: float) -> None:
        self._load = load
        self._ttl_s = ttl_s
        self._entries: dict[str, tuple[Project, float]] = {}
        self._loading: dict[str, asyncio.Task[Project | None]] = {}

    async def get(self, project_id: str, *, fresh: bool = False) -> Project | None:
        """The project (None when there is none)."""
        entry = self._entries.get(project_id)
        if entry is not None and not fresh and time.monotonic() - entry[1] < self._ttl_s:
            return entry[0]
        if fresh:
            return await self._read(project_id)
        loading = self._loading.get(project_id)
        if loading is None:
            loading = asyncio.create_task(self._read(project_id))
            self._loading[project_id] = loading
            loading.add_done_callback(self._loaded)
        return await asyncio.shield(loading)

    def _loaded(self, task: asyncio.Task[Project | None]) -> None:
        self._loading = {p: t for p, t in self._loading.items() if t is not task}
        if not task.cancelled():
            task.exception()  # seen here even if every request that waited for it is gone

    async def _read(self, project_id: str) -> Project | None:
        started = time.monotonic()
        project = await self._load(project_id)
        if project is None:
            self._entries.pop(project_id, None)
        else:
            self._entries[project_id] = (project, started)
        return project


@dataclass(frozen=True)
class KnownImage:
    """An image already stored (a Label Studio update whose payload carries no task)."""

    sha256: str


@dataclass(frozen=True)
class LabelRequest:
    """One label to save, from any channel, with the request fields to blame for problems."""

    index: int
    fields: LabelFields
    image: bytes | str | KnownImage
    """Bytes, or a reference: ``s3://<data bucket>/<key>`` or (if allowed) an http(s) URL."""
    image_field: str
    class_field: str
    labeler: str | None
    allow_http: bool = False
    annotation: AnnotationVersion | None = None


@dataclass(frozen=True)
class ItemResult:
    """What happened to one item of a request."""

    index: int
    status: Status
    label_id: uuid.UUID | None = None
    revision: int | None = None
    image_sha256: str | None = None
    error: ItemError | None = None

    @classmethod
    def of(cls, outcome: Outcome) -> ItemResult:
        return cls(
            outcome.index,
            outcome.status,
            outcome.label_id,
            outcome.revision,
            outcome.image_sha256,
        )


@dataclass(frozen=True)
class SaveResult:
    items: list[ItemResult]
    snapshot_id: str | None
    snapshot_sequence: int | None
    batch_id: uuid.UUID | None


@dataclass(frozen=True)
class Limits:
    max_image_bytes: int
    max_image_pixels: int
    prepare_concurrency: int = 16
    project_cache_s: float = 30.0


@dataclass(frozen=True)
class ProjectStats:
    project: Project
    labels: LabelStats


class LabelingService:
    """Saving labels from every channel, and reading labels and snapshots back."""

    def __init__(
        self,
        store: Store,
        images: ImageStore,
        fetcher: ImageFetcher,
        snapshots: SnapshotStorage,
        limits: Limits,
        *,
        group_max_items: int = 1000,
        group_linger_s: float = 0.002,
    ) -> None:
        self._store = store
        self._images = images
        self._fetcher = fetcher
        self._snapshots = snapshots
        self._limits = limits
        self.committer = GroupCommitter(
            self._commit, max_items=group_max_items, linger_s=group_linger_s
        )
        self._projects = ProjectCache(store.project, ttl_s=limits.project_cache_s)

    # -- saving --

    async def save(self, project_id: str, requests: list[LabelRequest]) -> SaveResult:
        """Validate and store each item's image, then commit the valid items together.

        Emits one labels.saved (through the group's snapshot) unless nothing changed. Invalid
        items are refused one by one and store nothing; an outage fails the whole request.
        """
        project = await self._project(project_id)
        prepared = await self._prepare_all(project, requests)
        changes: list[Change] = [p for p in prepared if isinstance(p, Upsert)]
        committed = await self.committer.submit(project_id, changes)
        results = {o.index: ItemResult.of(o) for o in committed.outcomes}
        for request, item in zip(requests, prepared, strict=True):
            if not isinstance(item, Upsert):
                results[request.index] = ItemResult(request.index, "rejected", error=item)
        return SaveResult(
            items=[results[i] for i in sorted(results)],
            snapshot_id=committed.snapshot_id,
            snapshot_sequence=committed.snapshot_sequence,
            batch_id=committed.batch_id,
        )

    async def apply_webhook(self, project_id: str, webhook: Webhook) -> SaveResult:
        """Apply a Label Studio webhook: annotations become labels, deletions remove them."""
        if not webhook.handled:
            return SaveResult(items=[], snapshot_id=None, snapshot_sequence=None, batch_id=None)
        project = await self._project(project_id)
        annotation_ids = {item.annotation_id for item in webhook.items}
        known = await self._store.annotation_refs(project_id, annotation_ids)
        early: dict[int, ItemResult] = {}
        requests: list[LabelRequest] = []
        deletes: list[Change] = []
        for item in webhook.items:
            ref = known.get(item.annotation_id)
            if item.kind is ItemKind.CANCELLED:
                early[item.index] = ItemResult(item.index, "ignored")
            elif item.kind is ItemKind.REJECTED:
                early[item.index] = ItemResult(item.index, "rejected", error=item.error)
            elif item.kind is ItemKind.DELETE:
                deletes.append(DeleteAnnotation(item.index, item.annotation_id))
            elif (
                ref is not None
                and item.version is not None
                and ref.updated_at >= item.version.updated_at
            ):
                # Already applied (a redelivery) or older than what was: nothing to fetch.
                status: Status = (
                    "unchanged" if ref.updated_at == item.version.updated_at else "ignored"
                )
                early[item.index] = ItemResult(
                    item.index, status, ref.label_id, image_sha256=ref.image_sha256
                )
            elif item.fields is not None:
                requests.append(self._webhook_request(item, item.fields, ref))
        prepared = await self._prepare_all(project, requests)
        changes: list[Change] = [p for p in prepared if isinstance(p, Upsert)]
        changes += deletes
        for request, result in zip(requests, prepared, strict=True):
            if not isinstance(result, Upsert):
                early[request.index] = ItemResult(request.index, "rejected", error=result)
        if webhook.single:
            rejected = [r.error for r in early.values() if r.error is not None]
            if rejected:
                raise rejected[0]
        committed = await self.committer.submit(project_id, changes)
        for outcome in committed.outcomes:
            early[outcome.index] = ItemResult.of(outcome)
        return SaveResult(
            items=[early[i] for i in sorted(early)],
            snapshot_id=committed.snapshot_id,
            snapshot_sequence=committed.snapshot_sequence,
            batch_id=committed.batch_id,
        )

    async def _prepare_all(
        self, project: Project, requests: list[LabelRequest]
    ) -> list[Upsert | ItemError]:
        """Each request prepared (or its refusal), a few at a time."""
        gate = asyncio.Semaphore(self._limits.prepare_concurrency)

        async def prepare(request: LabelRequest) -> Upsert | ItemError:
            try:
                return await self._prepare(project, request)
            except (FieldError, ImageFetchFailedError) as error:
                return error

        async def gated(request: LabelRequest) -> Upsert | ItemError:
            async with gate:
                return await prepare(request)

        if len(requests) == 1:  # the common single-label post: no task to spawn
            return [await prepare(requests[0])]
        return list(await asyncio.gather(*(gated(r) for r in requests)))

    def _webhook_request(
        self, item: WebhookItem, fields: LabelFields, ref: AnnotationRef | None
    ) -> LabelRequest:
        image: bytes | str | KnownImage
        if item.image_ref is not None:
            image = item.image_ref
        elif ref is not None and ref.image_sha256 is not None:
            image = KnownImage(ref.image_sha256)
        else:
            image = ""
        return LabelRequest(
            index=item.index,
            fields=fields,
            image=image,
            image_field=item.image_field,
            class_field=f"{item.field}.result",
            labeler=item.labeler,
            allow_http=True,
            annotation=item.version,
        )

    async def _prepare(self, project: Project, request: LabelRequest) -> Upsert:
        """Check the item against the project and its image, then store the image."""
        fields = request.fields
        if fields.class_name not in project.class_names:
            project = await self._project(project.project_id, fresh=True)
            if fields.class_name not in project.class_names:
                raise UnknownClassError(
                    f"class {fields.class_name!r} is not in project {project.project_id!r}",
                    field=request.class_field,
                    details={"class_names": project.class_names},
                )
        if isinstance(request.image, KnownImage):
            sha = request.image.sha256
        else:
            data = await self._image_bytes(request.image, request)
            limits = self._limits
            if len(data) <= INLINE_CHECK_BYTES:
                checked = check_image(
                    data,
                    max_bytes=limits.max_image_bytes,
                    max_pixels=limits.max_image_pixels,
                    field=request.image_field,
                )
            else:
                checked = await asyncio.to_thread(
                    check_image,
                    data,
                    max_bytes=limits.max_image_bytes,
                    max_pixels=limits.max_image_pixels,
                    field=request.image_field,
                )
            sha = await self._store_image(checked)
        return Upsert(
            index=request.index,
            image_sha256=sha,
            image_key=image_key(sha),
            content=LabelContent.of(fields),
            labeler=request.labeler,
            external_id=fields.external_id,
            annotation=request.annotation,
        )

    async def _store_image(self, checked: CheckedImage) -> str:
        await self._images.put(checked)
        return checked.sha256

    async def _image_bytes(self, image: bytes | str, request: LabelRequest) -> bytes:
        """The bytes of an upload, or of the object or URL an image reference names."""
        field_name = request.image_field
        if isinstance(image, bytes):
            return image
        if image.startswith("s3://"):
            bucket, _, key = image.removeprefix("s3://").partition("/")
            if bucket != self._images.bucket or not key or "\x00" in key:
                raise ImageSourceRefusedError(
                    f"images are read from s3://{self._images.bucket}/<key> only",
                    field=field_name,
                )
            size = await self._images.size(key)
            if size is None:
                raise ImageNotFoundError(f"no object {image}", field=field_name)
            if size > self._limits.max_image_bytes:
                raise ImageTooLargeError(
                    f"image is {size} bytes, more than the limit of {self._limits.max_image_bytes}",
                    field=field_name,
                    details={"limit_bytes": self._limits.max_image_bytes},
                )
            try:
                return await self._images.read(key)
            except NotFoundError as error:
                raise ImageNotFoundError(f"no object {image}", field=field_name) from error
        if request.allow_http and image.startswith(("http://", "https://")):
            return await self._fetcher.fetch(
                image, max_bytes=self._limits.max_image_bytes, field=field_name
            )
        if not image:
            raise FieldError("the task has no image", field=field_name)
        allowed = f"s3://{self._images.bucket}/<key>"
        if request.allow_http:
            allowed += " or an http(s) URL on an allow-listed host"
        raise ImageSourceRefusedError(
            f"unsupported image reference; expected {allowed}", field=field_name
        )

    async def _project(self, project_id: str, *, fresh: bool = False) -> Project:
        project = await self._projects.get(project_id, fresh=fresh)
        if project is None:
            raise ProjectNotFoundError(project_id)
        return project

    async def _commit(self, project_id: str, requests: list[list[Change]]) -> list[CommitResult]:
        """One group: lock the project, plan, write the segment, then rows, head and event."""
        now = utcnow()
        async with self._store.transaction() as tx:
            project = await tx.lock_project(project_id)
            if project is None:
                raise ProjectNotFoundError(project_id)
            changes = [c for request in requests for c in request]
            annotation_ids = {c.annotation_id for c in changes if isinstance(c, DeleteAnnotation)}
            annotation_ids |= {
                c.annotation.annotation_id
                for c in changes
                if isinstance(c, Upsert) and c.annotation is not None
            }
            refs = await tx.annotation_refs(project_id, annotation_ids) if annotation_ids else {}
            shas = {c.image_sha256 for c in changes if isinstance(c, Upsert)}
            shas |= {r.image_sha256 for r in refs.values() if r.image_sha256 is not None}
            labels = await tx.labels_by_image(project_id, shas)
            plan = plan_group(project, requests, labels, refs, now)
            if plan.refs:
                await tx.save_annotation_refs(plan.refs)
            # Also when nothing changed: an image labeled before it was requested (a request
            # racing the label) is answered by the label it has.
            await tx.mark_requests_labeled(project_id, plan.live_labels, now)
            if not plan.changed:
                return [CommitResult(outcomes=o) for o in plan.outcomes]
            return await self._write_snapshot(tx, project, plan, now)

    async def _write_snapshot(
        self, tx: Transaction, project: Project, plan: GroupPlan, now: datetime
    ) -> list[CommitResult]:
        batch_id = uuid.uuid4()
        entries = [label.entry() for label in plan.upserts]
        snapshot_id = snapshot_id_for(project.head_snapshot_id, entries, plan.deletes)
        sequence = project.head_sequence + 1
        # The segment goes to S3 before the transaction commits: a snapshot id that reaches
        # the database (and labels.saved) always resolves. A failed commit leaves an orphan
        # segment nobody references, which is harmless.
        await self._snapshots.write_segment(
            SnapshotSegment(
                snapshot_id=snapshot_id,
                project_id=project.project_id,
                parent_snapshot_id=project.head_snapshot_id,
                batch_id=batch_id,
                created_at=now,
                upserts=entries,
                deletes=plan.deletes,
            )
        )
        await tx.delete_labels(project.project_id, plan.deletes)
        await tx.write_labels([replace(label, snapshot_id=snapshot_id) for label in plan.upserts])
        await tx.add_history([replace(s, snapshot_id=snapshot_id) for s in plan.superseded])
        await tx.add_snapshot(
            SnapshotRecord(
                snapshot_id=snapshot_id,
                project_id=project.project_id,
                parent_snapshot_id=project.head_snapshot_id,
                sequence=sequence,
                label_count=sum(plan.class_counts.values()),
                class_counts=plan.class_counts,
                batch_id=batch_id,
                created_at=now,
                upserted=len(plan.upserts),
                deleted=len(plan.deletes),
            )
        )
        await tx.move_head(project.project_id, snapshot_id, sequence, plan.class_counts)
        await tx.emit(labels_saved(project, plan, snapshot_id, batch_id))
        return [
            CommitResult(
                outcomes=o, snapshot_id=snapshot_id, snapshot_sequence=sequence, batch_id=batch_id
            )
            for o in plan.outcomes
        ]

    # -- reading --

    async def labels(
        self, project_id: str, cursor: str | None, limit: int
    ) -> tuple[list[Label], str | None]:
        """A page of live labels in a stable order, and the cursor of the next page."""
        after = decode_cursor(cursor)
        await self._existing(project_id)
        page = await self._store.labels_page(project_id, after, limit + 1)
        more = len(page) > limit
        page = page[:limit]
        last = page[-1].position if page and more else None
        return page, encode_cursor(last) if last is not None else None

    async def stats(self, project_id: str) -> ProjectStats:
        project = await self._existing(project_id)
        return ProjectStats(project=project, labels=await self._store.label_stats(project_id))

    async def snapshots(
        self, project_id: str, cursor: str | None, limit: int
    ) -> tuple[list[SnapshotRecord], str | None]:
        """A page of snapshots, newest first, and the cursor of the next page."""
        before = decode_cursor(cursor)
        await self._existing(project_id)
        page = await self._store.snapshots_page(project_id, before, limit + 1)
        more = len(page) > limit
        page = page[:limit]
        return page, encode_cursor(page[-1].sequence) if page and more else None

    async def snapshot(
        self, project_id: str, snapshot_id: str
    ) -> tuple[SnapshotRecord, SnapshotManifest]:
        """A snapshot and every label in it, resolved through its chain of segments."""
        await self._existing(project_id)
        record = await self._store.snapshot(project_id, snapshot_id)
        if record is None:
            raise SnapshotNotFoundError(
                f"snapshot {snapshot_id!r} not found in project {project_id!r}",
                details={"snapshot_id": snapshot_id},
            )
        return record, await self._snapshots.resolve(project_id, snapshot_id)

    async def _existing(self, project_id: str) -> Project:
        project = await self._store.project(project_id)
        if project is None:
            raise ProjectNotFoundError(project_id)
        return project


# --- the needs-label queue ----------------------------------------------------------------------

_QUEUE_CURSOR_PREFIX = "q1:"

MAX_IMAGE_KEY_BYTES = 1024
"""The longest key S3 stores."""


def encode_queue_cursor(position: QueuePosition) -> str:
    """An opaque page token for a place in the queue's order."""
    raw = (
        f"{_QUEUE_CURSOR_PREFIX}{position.score!r}|{position.created_at.isoformat()}|"
        f"{position.entry_id}"
    )
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_queue_cursor(cursor: str | None) -> QueuePosition | None:
    """The place in a page token; ``InvalidCursorError`` (422) for anything we did not issue."""
    if cursor is None or cursor == "":
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not raw.startswith(_QUEUE_CURSOR_PREFIX):
            raise ValueError(raw)
        score, created_at, entry_id = raw.removeprefix(_QUEUE_CURSOR_PREFIX).split("|")
        position = QueuePosition(
            score=float(score),
            created_at=datetime.fromisoformat(created_at),
            entry_id=int(entry_id),
        )
    except (binascii.Error, UnicodeDecodeError, ValueError) as error:
        raise InvalidCursorError("cursor is not one this service issued", field="cursor") from error
    if (
        not math.isfinite(position.score)
        or position.created_at.tzinfo is None
        or position.entry_id < 0
    ):
        raise InvalidCursorError("cursor is not one this service issued", field="cursor")
    return position


def requested_images(event: LabelsRequestedV1, now: datetime) -> list[NewRequestedImage]:
    """The images a labels.requested asks for, once each (its highest-scored item), by sha256.

    ``InvalidLabelsRequestedError`` names the first item field the queue cannot hold: a score
    that is no finite number would sort above every real one, and PostgreSQL text cannot hold
    NUL characters.
    """
    payload = event.payload
    best: dict[str, LabelRequestItem] = {}

    def refuse(where: str, problem: str) -> InvalidLabelsRequestedError:
        # The field leads the message: a dead letter's error header carries the message only.
        return InvalidLabelsRequestedError(f"{where}: {problem}", field=where)

    for index, item in enumerate(payload.items):
        at = f"payload.items.{index}"
        if not math.isfinite(item.score):
            raise refuse(f"{at}.score", f"must be a finite number, not {item.score!r}")
        if not item.image_key or len(item.image_key.encode()) > MAX_IMAGE_KEY_BYTES:
            raise refuse(
                f"{at}.image_key", f"must be an S3 key of 1 to {MAX_IMAGE_KEY_BYTES} bytes"
            )
        for name in ("image_key", "predicted_class"):
            value = getattr(item, name)
            if value is not None and "\x00" in value:
                raise refuse(f"{at}.{name}", "must not contain NUL characters")
        kept = best.get(item.input_sha256)
        if kept is None or item.score > kept.score:
            best[item.input_sha256] = item
    return [
        NewRequestedImage(
            project_id=payload.project_id,
            input_sha256=sha,
            image_key=item.image_key,
            score=item.score,
            predicted_class=item.predicted_class,
            confidence=item.confidence,
            request_id=payload.request_id,
            report_id=payload.report_id,
            reason=payload.reason,
            requested_at=event.occurred_at,
            now=now,
        )
        # Sorted: concurrent writers take the rows' locks in one order.
        for sha, item in sorted(best.items())
    ]


def queue_position(entry: RequestedImage) -> QueuePosition:
    """Where ``entry`` stands in the queue's order."""
    return QueuePosition(score=entry.score, created_at=entry.created_at, entry_id=entry.entry_id)


@dataclass(frozen=True)
class ImageBytes:
    """An image read back from the data bucket, with the media type its header names."""

    data: bytes
    content_type: str


class LabelRequestQueue:
    """The needs-label queue: images labelers are asked to label, the most drifted first.

    labels.requested opens entries; a label saved for the same image closes its open entry as
    ``labeled`` (``LabelingService`` does, in the label's own transaction); a labeler may
    dismiss one. An image labeled or dismissed in the project already is not asked for again.
    """

    def __init__(
        self, store: Store, images: ImageStore, *, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self._store = store
        self._images = images
        self._clock = clock

    async def labels_requested(self, event: LabelsRequestedV1) -> None:
        """Reacts to labels.requested: opens an entry per image, or merges into the image's
        open one; emits nothing. A redelivered event changes nothing."""
        payload = event.payload
        images = requested_images(event, self._clock())
        shas = {image.input_sha256 for image in images}
        async with self._store.transaction() as tx:
            if not await tx.claim(event.event_id):
                log.info("labels.requested already handled", request_id=str(payload.request_id))
                return
            # The lock label commits take: a label committed meanwhile is either seen below or
            # closes the entry opened here.
            project = await tx.lock_project(payload.project_id)
            labeled = await tx.labels_by_image(payload.project_id, shas)
            dismissed = await tx.dismissed_images(payload.project_id, shas)
            opened = [
                image
                for image in images
                if image.input_sha256 not in labeled and image.input_sha256 not in dismissed
            ]
            await tx.open_requests(opened)
        log.info(
            "labels requested",
            project_id=payload.project_id,
            request_id=str(payload.request_id),
            reason=payload.reason,
            images=len(images),
            opened_or_merged=len(opened),
            labeled_already=len(labeled),
            dismissed_already=len(dismissed),
            # Kept all the same: they show once a project is created under this id.
            unknown_project=project is None,
        )

    async def page(
        self, project_id: str, status: RequestStatus, cursor: str | None, limit: int
    ) -> tuple[list[RequestedImage], str | None]:
        """A page of one status's entries, highest score first then oldest, and the cursor of
        the next page."""
        after = decode_queue_cursor(cursor)
        await self._existing(project_id)
        page = await self._store.requests_page(project_id, status, after, limit + 1)
        more = len(page) > limit
        page = page[:limit]
        return page, encode_queue_cursor(queue_position(page[-1])) if page and more else None

    async def dismiss(self, project_id: str, sha: str, by: str | None) -> RequestedImage:
        """Take an image off the queue for good (a labeler's call). Dismissing twice is fine;
        dismissing one a label answered is ``LabelRequestClosedError``."""
        await self._existing(project_id)
        async with self._store.transaction() as tx:
            entry = await tx.lock_open_request(project_id, sha)
            if entry is not None:
                dismissed = await tx.set_request_status(entry.entry_id, "dismissed", self._clock())
                log.info(
                    "label request dismissed",
                    project_id=project_id,
                    input_sha256=sha,
                    request_id=str(entry.request_id),
                    by=by,
                )
                return dismissed
        latest = await self._store.requested_image(project_id, sha)
        if latest is None:
            raise LabelRequestNotFoundError(project_id, sha)
        if latest.status == "dismissed":
            return latest
        raise LabelRequestClosedError(
            f"the request for image {sha} was answered by label {latest.labeled_label_id}",
            details={"input_sha256": sha, "status": latest.status},
        )

    async def image(self, project_id: str, sha: str) -> ImageBytes:
        """The bytes of a requested image, read from the data bucket where serving left it."""
        await self._existing(project_id)
        entry = await self._store.requested_image(project_id, sha)
        if entry is None:
            raise LabelRequestNotFoundError(project_id, sha)
        try:
            data = await self._images.read(entry.image_key)
        except NotFoundError as error:
            raise RequestedImageMissingError(
                f"the image of the request for {sha} is not in the data bucket",
                details={"input_sha256": sha, "image_key": entry.image_key},
            ) from error
        return ImageBytes(data=data, content_type=media_type(data))

    async def _existing(self, project_id: str) -> Project:
        project = await self._store.project(project_id)
        if project is None:
            raise ProjectNotFoundError(project_id)
        return project
