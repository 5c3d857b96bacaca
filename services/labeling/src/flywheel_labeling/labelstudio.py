"""Label Studio webhooks, read exactly as Label Studio sends them.

Label Studio posts ``{"action": ..., <key>: <serialized instance(s)>, "project": {...}}``
(``label_studio/webhooks/models.py`` and ``utils.py``):

- ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED``: ``annotation`` is one annotation and ``task``
  its task (older releases send no ``task``; ``annotation.task`` is always the task id);
- ``ANNOTATIONS_CREATED`` (bulk, e.g. predictions turned into annotations): ``annotation`` is a
  list and ``task`` the list of their tasks, in the same order;
- ``ANNOTATIONS_DELETED``: ``annotations`` is a list of ``{"id": ...}``.

An annotation's ``result`` is a list of regions; a classification is the ``choices`` region
(``{"type": "choices", "value": {"choices": ["7"]}, ...}``). ``completed_by`` is the user id.
Every other action is acknowledged and ignored.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from flywheel_labeling.errors import FieldError
from flywheel_labeling.ports import AnnotationVersion, LabelFields

ANNOTATION_CREATED = "ANNOTATION_CREATED"
ANNOTATIONS_CREATED = "ANNOTATIONS_CREATED"
ANNOTATION_UPDATED = "ANNOTATION_UPDATED"
ANNOTATIONS_DELETED = "ANNOTATIONS_DELETED"
HANDLED_ACTIONS = frozenset(
    {ANNOTATION_CREATED, ANNOTATIONS_CREATED, ANNOTATION_UPDATED, ANNOTATIONS_DELETED}
)


M = TypeVar("M", bound=BaseModel)


class _Lenient(BaseModel):
    # Label Studio adds fields release after release; only the ones read here must be there.
    model_config = ConfigDict(extra="ignore", frozen=True)


class LSTask(_Lenient):
    id: int
    data: dict[str, Any] = {}


class LSAnnotation(_Lenient):
    id: int
    result: list[dict[str, Any]] = []
    was_cancelled: bool = False
    completed_by: int | str | dict[str, Any] | None = None
    updated_at: datetime
    task: int | dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    """Prediction shown when annotating (older releases; ``{}`` when there was none)."""
    parent_prediction: int | None = None
    """Id of the prediction the annotation started from (newer releases)."""


class LSDeleted(_Lenient):
    id: int


class _SingleAnnotation(_Lenient):
    annotation: LSAnnotation
    task: LSTask | None = None


class _BulkAnnotations(_Lenient):
    annotation: list[LSAnnotation]
    task: list[LSTask] = []


class _Deleted(_Lenient):
    annotations: list[LSDeleted]


class ItemKind(enum.Enum):
    UPSERT = "upsert"
    DELETE = "delete"
    CANCELLED = "cancelled"
    REJECTED = "rejected"


@dataclass(frozen=True)
class WebhookItem:
    """One annotation of a webhook, understood."""

    index: int
    annotation_id: int
    kind: ItemKind
    field: str
    """Where the annotation sits in the payload (``annotation``, ``annotation.2``)."""
    version: AnnotationVersion | None = None
    fields: LabelFields | None = None
    image_ref: str | None = None
    """``data.<image field>`` of the annotation's task, when the payload carried the task."""
    image_field: str = "task"
    """Where that image reference sits in the payload."""
    labeler: str | None = None
    error: FieldError | None = None


@dataclass(frozen=True)
class Webhook:
    action: str
    items: list[WebhookItem]
    single: bool
    """One annotation (its rejection fails the request) rather than a bulk action."""

    @property
    def handled(self) -> bool:
        return self.action in HANDLED_ACTIONS


class InvalidWebhookError(FieldError):
    code = "invalid_webhook"


def parse_webhook(body: Mapping[str, Any], image_field: str = "image") -> Webhook:
    """The annotations a webhook body creates, updates or deletes."""
    action = body.get("action")
    if not isinstance(action, str):
        raise InvalidWebhookError("Label Studio payload has no 'action'", field="action")
    if action in (ANNOTATION_CREATED, ANNOTATION_UPDATED):
        single = _validate(_SingleAnnotation, body)
        tasks = [single.task] if single.task is not None else []
        return Webhook(
            action, [_annotation_item(0, "annotation", single.annotation, tasks, image_field)], True
        )
    if action == ANNOTATIONS_CREATED:
        bulk = _validate(_BulkAnnotations, body)
        items = [
            _annotation_item(i, f"annotation.{i}", annotation, bulk.task, image_field)
            for i, annotation in enumerate(bulk.annotation)
        ]
        return Webhook(action, items, False)
    if action == ANNOTATIONS_DELETED:
        deleted = _validate(_Deleted, body)
        items = [
            WebhookItem(i, d.id, ItemKind.DELETE, f"annotations.{i}")
            for i, d in enumerate(deleted.annotations)
        ]
        return Webhook(action, items, False)
    return Webhook(action, [], False)


def _validate(model: type[M], body: Mapping[str, Any]) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as error:
        fields = [
            {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
            for e in error.errors()
        ]
        first = fields[0]
        raise InvalidWebhookError(
            f"invalid Label Studio payload: {first['field']}: {first['message']}",
            field=first["field"],
            details={"fields": fields},
        ) from error


def _annotation_item(
    index: int, field: str, annotation: LSAnnotation, tasks: list[LSTask], image_field: str
) -> WebhookItem:
    version = AnnotationVersion(annotation.id, annotation.updated_at)
    base: dict[str, Any] = {
        "index": index,
        "annotation_id": annotation.id,
        "field": field,
        "version": version,
    }
    if annotation.was_cancelled:
        return WebhookItem(kind=ItemKind.CANCELLED, **base)
    try:
        class_name = _single_choice(annotation.result, f"{field}.result")
        predicted_class, model_version, confidence, prediction_id = _prediction(annotation)
        fields = LabelFields(
            class_name=class_name,
            prediction_id=prediction_id,
            predicted_class=predicted_class,
            model_version=model_version,
            confidence=confidence,
            external_id=version.external_id,
        )
    except FieldError as error:
        return WebhookItem(kind=ItemKind.REJECTED, error=error, **base)
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(p) for p in problem["loc"])
        return WebhookItem(
            kind=ItemKind.REJECTED,
            error=InvalidWebhookError(f"{where}: {problem['msg']}", field=f"{field}.result"),
            **base,
        )
    image_ref, image_at = _image_ref(annotation, tasks, image_field, field)
    return WebhookItem(
        kind=ItemKind.UPSERT,
        fields=fields,
        image_ref=image_ref,
        image_field=image_at,
        labeler=_labeler(annotation.completed_by),
        **base,
    )


def _choices(results: list[dict[str, Any]]) -> list[str]:
    found: list[str] = []
    for region in results:
        value = region.get("value")
        if region.get("type") != "choices" or not isinstance(value, dict):
            continue
        choices = value.get("choices")
        if isinstance(choices, list):
            found += [c for c in choices if isinstance(c, str)]
    return list(dict.fromkeys(found))


def _single_choice(results: list[dict[str, Any]], field: str) -> str:
    choices = _choices(results)
    if not choices:
        raise InvalidWebhookError(
            "annotation has no 'choices' result: a classification needs exactly one choice",
            field=field,
        )
    if len(choices) > 1:
        raise InvalidWebhookError(
            f"annotation has {len(choices)} choices ({', '.join(choices)}): a classification "
            "needs exactly one",
            field=field,
        )
    return choices[0]


def _prediction(
    annotation: LSAnnotation,
) -> tuple[str | None, str | None, float | None, str | None]:
    """Predicted class, model version, score and prediction id of the pre-fill, if any."""
    prediction = annotation.prediction or {}
    results = prediction.get("result")
    choices = _choices(results) if isinstance(results, list) else []
    predicted = choices[0] if len(choices) == 1 else None
    model_version = prediction.get("model_version")
    score = prediction.get("score")
    confidence = float(score) if isinstance(score, int | float) and 0 <= score <= 1 else None
    prediction_id = prediction.get("id", annotation.parent_prediction)
    return (
        predicted,
        str(model_version) if model_version not in (None, "") else None,
        confidence,
        str(prediction_id) if prediction_id is not None else None,
    )


def _image_ref(
    annotation: LSAnnotation, tasks: list[LSTask], image_field: str, field: str
) -> tuple[str | None, str]:
    """The task's image reference and where it sits in the payload."""
    data: Any = None
    where = f"{field}.task.data.{image_field}"
    if isinstance(annotation.task, dict):
        data = annotation.task.get("data")
    else:
        for position, task in enumerate(tasks):
            if task.id == annotation.task or (annotation.task is None and len(tasks) == 1):
                data = task.data
                where = (
                    f"task.data.{image_field}"
                    if field == "annotation"
                    else (f"task.{position}.data.{image_field}")
                )
                break
    value = data.get(image_field) if isinstance(data, dict) else None
    return (value if isinstance(value, str) and value else None), where


def _labeler(completed_by: int | str | dict[str, Any] | None) -> str | None:
    if isinstance(completed_by, dict):
        for key in ("email", "username", "id"):
            if completed_by.get(key) not in (None, ""):
                return str(completed_by[key])
        return None
    return None if completed_by is None else str(completed_by)
