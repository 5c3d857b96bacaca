"""``Store`` on PostgreSQL: the labeling tables plus the runtime's outbox."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import RowMapping, Table, delete, func, or_, select, tuple_, update
from sqlalchemy.dialects.postgresql import Insert, insert
from sqlalchemy.ext.asyncio import AsyncSession

from flywheel_contracts import Event
from flywheel_contracts.datasets import Split
from flywheel_contracts.events import RetrainPolicy, TaskType
from flywheel_labeling.adapters.tables import (
    label_history,
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
    Project,
    SnapshotRecord,
    Superseded,
)
from flywheel_runtime.db import Database
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


class SqlTransaction:
    """One transaction on the labeling schema."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

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


class SqlStore:
    """The labeling schema of one PostgreSQL database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqlTransaction]:
        async with self._db.transaction() as session:
            yield SqlTransaction(session)

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
