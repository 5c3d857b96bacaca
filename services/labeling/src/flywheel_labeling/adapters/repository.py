"""``Store`` on PostgreSQL: the labeling tables plus the runtime's outbox and idempotency
claim."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import (
    RowMapping,
    Table,
    Uuid,
    and_,
    case,
    delete,
    func,
    literal,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import Insert, insert
from sqlalchemy.ext.asyncio import AsyncSession

from flywheel_contracts import Event
from flywheel_contracts.datasets import Split
from flywheel_contracts.events import RetrainPolicy, TaskType
from flywheel_labeling.adapters.tables import (
    label_history,
    label_requests,
    label_studio_annotations,
    labels,
    projects,
    snapshots,
)
from flywheel_labeling.ports import (
    AnnotationRef,
    Label,
    LabelContent,
    LabelStats,
    NewRequestedImage,
    Project,
    QueuePosition,
    RequestedImage,
    RequestStatus,
    SnapshotRecord,
    Superseded,
)
from flywheel_runtime.db import Database
from flywheel_runtime.idempotency import claim
from flywheel_runtime.outbox import add_event


def _upsert(table: Table, keys: list[str], kept: tuple[str, ...] = ()) -> Insert:
    """``INSERT … ON CONFLICT (keys) DO UPDATE`` of every other column but ``kept``.

    Built once and executed with a list of rows (executemany), so SQLAlchemy compiles it once
    however many rows a group writes.
    """
    statement = insert(table)
    return statement.on_conflict_do_update(
        index_elements=[table.c[k] for k in keys],
        set_={
            c.name: statement.excluded[c.name]
            for c in table.c
            if c.name not in keys and c.name not in kept
        },
    )


_UPSERT_LABELS = _upsert(labels, ["label_id"], kept=("position", "project_id", "created_at"))
_UPSERT_REFS = _upsert(label_studio_annotations, ["project_id", "annotation_id"])


def _open_requests() -> Insert:
    """Open an entry per image, or merge into its open one: the highest score, and the request
    fields (pre-label and image key included) of the newest request."""
    statement = insert(label_requests)
    new, current = statement.excluded, label_requests.c
    newer = new.requested_at >= current.requested_at

    def newest(column: str) -> Any:
        return case((newer, new[column]), else_=current[column])

    return statement.on_conflict_do_update(
        index_elements=[current.project_id, current.input_sha256],
        # A literal, not a bound parameter: PostgreSQL matches the partial index's predicate
        # textually, and a parameter (as executemany sends it) matches none.
        index_where=text("status = 'open'"),
        set_={
            "score": func.greatest(current.score, new.score),
            **{
                column: newest(column)
                for column in (
                    "request_id",
                    "report_id",
                    "reason",
                    "image_key",
                    "predicted_class",
                    "confidence",
                )
            },
            "requested_at": func.greatest(current.requested_at, new.requested_at),
            "updated_at": new.updated_at,
        },
    )


_OPEN_REQUESTS = _open_requests()


class SqlTransaction:
    """One transaction on the labeling schema."""

    def __init__(self, session: AsyncSession, consumer: str) -> None:
        self._session = session
        self._consumer = consumer

    async def insert_project(self, project: Project) -> bool:
        result = await self._session.execute(
            insert(projects)
            .values(_project_row(project))
            .on_conflict_do_nothing()
            .returning(projects.c.project_id)
        )
        return result.first() is not None

    async def lock_project(self, project_id: str) -> Project | None:
        row = (
            await self._session.execute(
                select(projects).where(projects.c.project_id == project_id).with_for_update()
            )
        ).first()
        return None if row is None else _project(row._mapping)

    async def save_project(self, project: Project) -> None:
        row = _project_row(project)
        for kept in ("project_id", "created_at", "head_snapshot_id", "head_sequence"):
            row.pop(kept)
        row.pop("label_count")
        row.pop("class_counts")
        await self._session.execute(
            update(projects).where(projects.c.project_id == project.project_id).values(row)
        )

    async def move_head(
        self, project_id: str, snapshot_id: str, sequence: int, class_counts: dict[str, int]
    ) -> None:
        await self._session.execute(
            update(projects)
            .where(projects.c.project_id == project_id)
            .values(
                head_snapshot_id=snapshot_id,
                head_sequence=sequence,
                label_count=sum(class_counts.values()),
                class_counts=class_counts,
            )
        )

    async def labels_by_image(self, project_id: str, shas: set[str]) -> dict[str, Label]:
        if not shas:
            return {}
        rows = await self._session.execute(
            select(labels).where(
                labels.c.project_id == project_id, labels.c.image_sha256.in_(sorted(shas))
            )
        )
        return {row.image_sha256: _label(row._mapping) for row in rows}

    async def annotation_refs(
        self, project_id: str, annotation_ids: set[int]
    ) -> dict[int, AnnotationRef]:
        return await _annotation_refs(self._session, project_id, annotation_ids)

    async def write_labels(self, written: list[Label]) -> None:
        if written:
            await self._session.execute(_UPSERT_LABELS, [_label_row(label) for label in written])

    async def delete_labels(self, project_id: str, label_ids: list[uuid.UUID]) -> None:
        if label_ids:
            await self._session.execute(
                delete(labels).where(
                    labels.c.project_id == project_id, labels.c.label_id.in_(label_ids)
                )
            )

    async def add_history(self, superseded: list[Superseded]) -> None:
        if not superseded:
            return
        await self._session.execute(
            insert(label_history),
            [
                _label_row(s.label)
                | {"reason": s.reason, "superseded_in": s.snapshot_id, "superseded_at": s.at}
                for s in superseded
            ],
        )

    async def save_annotation_refs(self, refs: list[AnnotationRef]) -> None:
        if not refs:
            return
        await self._session.execute(
            _UPSERT_REFS,
            [
                {
                    "project_id": r.project_id,
                    "annotation_id": r.annotation_id,
                    "updated_at": r.updated_at,
                    "label_id": r.label_id,
                    "image_sha256": r.image_sha256,
                    "deleted": r.deleted,
                }
                for r in refs
            ],
        )

    async def add_snapshot(self, snapshot: SnapshotRecord) -> None:
        await self._session.execute(insert(snapshots).values(snapshot.model_dump()))

    async def emit(self, event: Event[Any]) -> None:
        await add_event(self._session, event)

    async def claim(self, event_id: uuid.UUID) -> bool:
        return await claim(self._session, self._consumer, event_id)

    async def dismissed_images(self, project_id: str, shas: set[str]) -> set[str]:
        if not shas:
            return set()
        rows = await self._session.execute(
            select(label_requests.c.input_sha256)
            .where(
                label_requests.c.project_id == project_id,
                label_requests.c.input_sha256.in_(sorted(shas)),
                label_requests.c.status == "dismissed",
            )
            .distinct()
        )
        return set(rows.scalars())

    async def open_requests(self, images: list[NewRequestedImage]) -> None:
        if not images:
            return
        await self._session.execute(
            _OPEN_REQUESTS,
            [
                {
                    "project_id": image.project_id,
                    "request_id": image.request_id,
                    "report_id": image.report_id,
                    "reason": image.reason,
                    "input_sha256": image.input_sha256,
                    "image_key": image.image_key,
                    "score": image.score,
                    "predicted_class": image.predicted_class,
                    "confidence": image.confidence,
                    "status": "open",
                    "requested_at": image.requested_at,
                    "created_at": image.now,
                    "updated_at": image.now,
                }
                for image in images
            ],
        )

    async def mark_requests_labeled(
        self, project_id: str, labels: dict[str, uuid.UUID], now: datetime
    ) -> None:
        if not labels:
            return
        await self._session.execute(
            update(label_requests)
            .where(
                label_requests.c.project_id == project_id,
                label_requests.c.status == "open",
                label_requests.c.input_sha256.in_(sorted(labels)),
            )
            .values(
                status="labeled",
                labeled_label_id=case(
                    {sha: literal(label_id, Uuid) for sha, label_id in labels.items()},
                    value=label_requests.c.input_sha256,
                ),
                updated_at=now,
            )
        )

    async def lock_open_request(self, project_id: str, sha: str) -> RequestedImage | None:
        row = (
            await self._session.execute(
                select(label_requests)
                .where(
                    label_requests.c.project_id == project_id,
                    label_requests.c.input_sha256 == sha,
                    label_requests.c.status == "open",
                )
                .with_for_update()
            )
        ).first()
        return None if row is None else _requested(row._mapping)

    async def set_request_status(
        self, entry_id: int, status: RequestStatus, now: datetime
    ) -> RequestedImage:
        row = (
            await self._session.execute(
                update(label_requests)
                .where(label_requests.c.entry_id == entry_id)
                .values(status=status, updated_at=now)
                .returning(*label_requests.c)
            )
        ).one()
        return _requested(row._mapping)


class SqlStore:
    """The labeling schema of one PostgreSQL database."""

    def __init__(self, db: Database, *, consumer: str) -> None:
        self._db = db
        self._consumer = consumer
        """Name the idempotency claims of this service's consumers are recorded under."""

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqlTransaction]:
        async with self._db.transaction() as session:
            yield SqlTransaction(session, self._consumer)

    async def project(self, project_id: str) -> Project | None:
        async with self._db.transaction() as session:
            row = (
                await session.execute(select(projects).where(projects.c.project_id == project_id))
            ).first()
        return None if row is None else _project(row._mapping)

    async def projects(self) -> list[Project]:
        async with self._db.transaction() as session:
            rows = await session.execute(select(projects).order_by(projects.c.project_id))
            return [_project(row._mapping) for row in rows]

    async def annotation_refs(
        self, project_id: str, annotation_ids: set[int]
    ) -> dict[int, AnnotationRef]:
        async with self._db.transaction() as session:
            return await _annotation_refs(session, project_id, annotation_ids)

    async def labels_page(self, project_id: str, after: int | None, limit: int) -> list[Label]:
        query = select(labels).where(labels.c.project_id == project_id)
        if after is not None:
            query = query.where(labels.c.position > after)
        async with self._db.transaction() as session:
            rows = await session.execute(query.order_by(labels.c.position).limit(limit))
            return [_label(row._mapping) for row in rows]

    async def label_stats(self, project_id: str) -> LabelStats:
        live = labels.c.project_id == project_id
        async with self._db.transaction() as session:

            async def grouped(column: Any) -> dict[str, int]:
                rows = await session.execute(
                    select(column, func.count()).where(live).group_by(column).order_by(column)
                )
                return {str(key): int(n) for key, n in rows.all() if key is not None}

            totals = (
                await session.execute(
                    select(
                        func.count(),
                        func.count().filter(
                            or_(
                                labels.c.prediction_id.is_not(None),
                                labels.c.predicted_class.is_not(None),
                            )
                        ),
                        func.count().filter(labels.c.corrected),
                    ).where(live)
                )
            ).one()
            snapshot_count = (
                await session.execute(
                    select(func.count())
                    .select_from(snapshots)
                    .where(snapshots.c.project_id == project_id)
                )
            ).scalar_one()
            return LabelStats(
                total=int(totals[0]),
                prefilled=int(totals[1]),
                corrected=int(totals[2]),
                by_class=await grouped(labels.c.class_name),
                by_split=await grouped(labels.c.split),
                by_source=await grouped(labels.c.source),
                by_labeler=await grouped(labels.c.labeler),
                snapshots=int(snapshot_count),
            )

    async def snapshots_page(
        self, project_id: str, before: int | None, limit: int
    ) -> list[SnapshotRecord]:
        query = select(snapshots).where(snapshots.c.project_id == project_id)
        if before is not None:
            query = query.where(snapshots.c.sequence < before)
        async with self._db.transaction() as session:
            rows = await session.execute(query.order_by(snapshots.c.sequence.desc()).limit(limit))
            return [SnapshotRecord.model_validate(dict(row._mapping)) for row in rows]

    async def snapshot(self, project_id: str, snapshot_id: str) -> SnapshotRecord | None:
        async with self._db.transaction() as session:
            row = (
                await session.execute(
                    select(snapshots).where(
                        tuple_(snapshots.c.project_id, snapshots.c.snapshot_id)
                        == (project_id, snapshot_id)
                    )
                )
            ).first()
        return None if row is None else SnapshotRecord.model_validate(dict(row._mapping))

    async def requests_page(
        self, project_id: str, status: RequestStatus, after: QueuePosition | None, limit: int
    ) -> list[RequestedImage]:
        table = label_requests.c
        query = select(label_requests).where(table.project_id == project_id, table.status == status)
        if after is not None:
            query = query.where(
                or_(
                    table.score < after.score,
                    and_(
                        table.score == after.score,
                        or_(
                            table.created_at > after.created_at,
                            and_(
                                table.created_at == after.created_at,
                                table.entry_id > after.entry_id,
                            ),
                        ),
                    ),
                )
            )
        query = query.order_by(table.score.desc(), table.created_at, table.entry_id).limit(limit)
        async with self._db.transaction() as session:
            rows = await session.execute(query)
            return [_requested(row._mapping) for row in rows]

    async def requested_image(self, project_id: str, sha: str) -> RequestedImage | None:
        table = label_requests.c
        async with self._db.transaction() as session:
            row = (
                await session.execute(
                    select(label_requests)
                    .where(table.project_id == project_id, table.input_sha256 == sha)
                    .order_by((table.status == "open").desc(), table.updated_at.desc())
                    .limit(1)
                )
            ).first()
        return None if row is None else _requested(row._mapping)


async def _annotation_refs(
    session: AsyncSession, project_id: str, annotation_ids: set[int]
) -> dict[int, AnnotationRef]:
    if not annotation_ids:
        return {}
    table = label_studio_annotations
    rows = await session.execute(
        select(table).where(
            table.c.project_id == project_id, table.c.annotation_id.in_(sorted(annotation_ids))
        )
    )
    return {
        row.annotation_id: AnnotationRef(
            project_id=row.project_id,
            annotation_id=row.annotation_id,
            updated_at=row.updated_at,
            label_id=row.label_id,
            image_sha256=row.image_sha256,
            deleted=row.deleted,
        )
        for row in rows
    }


def _project_row(project: Project) -> dict[str, Any]:
    return {
        "project_id": project.project_id,
        "name": project.name,
        "task_type": project.task_type.value,
        "class_names": project.class_names,
        "model_line": project.model_line,
        "policy": project.policy.model_dump(mode="json"),
        "revision": project.revision,
        "head_snapshot_id": project.head_snapshot_id,
        "head_sequence": project.head_sequence,
        "label_count": project.label_count,
        "class_counts": project.class_counts,
        "created_at": project.created_at,
        "updated_at": project.updated_at,
    }


def _project(row: RowMapping) -> Project:
    return Project(
        project_id=row["project_id"],
        name=row["name"],
        task_type=TaskType(row["task_type"]),
        class_names=row["class_names"],
        model_line=row["model_line"],
        policy=RetrainPolicy.model_validate(row["policy"]),
        revision=row["revision"],
        head_snapshot_id=row["head_snapshot_id"],
        head_sequence=row["head_sequence"],
        label_count=row["label_count"],
        class_counts=row["class_counts"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _label_row(label: Label) -> dict[str, Any]:
    content = label.content
    return {
        "label_id": label.label_id,
        "project_id": label.project_id,
        "image_sha256": label.image_sha256,
        "image_key": label.image_key,
        "split": label.split.value,
        "class_name": content.class_name,
        "source": content.source,
        "prediction_id": content.prediction_id,
        "model_version": content.model_version,
        "predicted_class": content.predicted_class,
        "confidence": content.confidence,
        "corrected": content.corrected,
        "labeler": label.labeler,
        "revision": label.revision,
        "external_id": label.external_id,
        "snapshot_id": label.snapshot_id,
        "created_at": label.created_at,
        "updated_at": label.updated_at,
    }


def _label(row: RowMapping) -> Label:
    return Label(
        label_id=row["label_id"],
        project_id=row["project_id"],
        image_sha256=row["image_sha256"],
        image_key=row["image_key"],
        split=Split(row["split"]),
        content=LabelContent(
            class_name=row["class_name"],
            source=row["source"],
            prediction_id=row["prediction_id"],
            model_version=row["model_version"],
            predicted_class=row["predicted_class"],
            confidence=row["confidence"],
        ),
        labeler=row["labeler"],
        revision=row["revision"],
        external_id=row["external_id"],
        snapshot_id=row["snapshot_id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        position=row.get("position"),
    )


def _requested(row: RowMapping) -> RequestedImage:
    return RequestedImage(
        entry_id=row["entry_id"],
        project_id=row["project_id"],
        input_sha256=row["input_sha256"],
        image_key=row["image_key"],
        score=row["score"],
        predicted_class=row["predicted_class"],
        confidence=row["confidence"],
        status=row["status"],
        request_id=row["request_id"],
        report_id=row["report_id"],
        reason=row["reason"],
        requested_at=row["requested_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        labeled_label_id=row["labeled_label_id"],
    )
