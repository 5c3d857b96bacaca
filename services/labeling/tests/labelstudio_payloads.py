"""Webhook bodies shaped exactly as Label Studio sends them (``label_studio/webhooks``).

``annotation`` and ``task`` are Label Studio's serializers with ``fields = '__all__'``; the
``project`` block is abridged to the fields every release sends.
"""

from typing import Any

PROJECT = {
    "id": 3,
    "title": "Digits",
    "description": "",
    "label_config": (
        '<View><Image name="image" value="$image"/>'
        '<Choices name="choice" toName="image">'
        '<Choice value="0"/><Choice value="1"/><Choice value="7"/></Choices></View>'
    ),
    "expert_instruction": "",
    "show_instruction": False,
    "show_skip_button": True,
    "enable_empty_annotation": True,
    "maximum_annotations": 1,
    "model_version": "",
    "is_draft": False,
    "is_published": False,
    "created_at": "2026-01-01T10:00:00.000000Z",
    "updated_at": "2026-01-01T10:00:00.000000Z",
    "sampling": "Sequential sampling",
    "organization": 1,
    "created_by": 1,
    "task_number": 2,
    "finished_task_number": 1,
    "total_predictions_number": 0,
    "total_annotations_number": 1,
    "num_tasks_with_annotations": 1,
    "useful_annotation_number": 1,
    "ground_truth_number": 0,
    "skipped_annotations_number": 0,
}


def task(task_id: int, image: str | None) -> dict[str, Any]:
    data: dict[str, Any] = {} if image is None else {"image": image}
    return {
        "id": task_id,
        "data": data,
        "meta": {},
        "created_at": "2026-01-01T10:01:00.000000Z",
        "updated_at": "2026-01-01T10:05:00.000000Z",
        "is_labeled": True,
        "overlap": 1,
        "inner_id": task_id,
        "total_annotations": 1,
        "cancelled_annotations": 0,
        "total_predictions": 0,
        "comment_count": 0,
        "unresolved_comment_count": 0,
        "last_comment_updated_at": None,
        "project": PROJECT["id"],
        "updated_by": 1,
        "file_upload": 7,
        "comment_authors": [],
    }


def annotation(
    annotation_id: int,
    task_id: int,
    choices: list[str] | None,
    *,
    updated_at: str = "2026-01-01T10:05:00.000000Z",
    completed_by: Any = 1,
    was_cancelled: bool = False,
    prediction: dict[str, Any] | None = None,
) -> dict[str, Any]:
    result = (
        []
        if choices is None
        else [
            {
                "value": {"choices": choices},
                "id": "pLpVn2rkZw",
                "from_name": "choice",
                "to_name": "image",
                "type": "choices",
                "origin": "manual",
            }
        ]
    )
    return {
        "id": annotation_id,
        "result": result,
        "was_cancelled": was_cancelled,
        "ground_truth": False,
        "created_at": "2026-01-01T10:04:00.000000Z",
        "updated_at": updated_at,
        "draft_created_at": None,
        "lead_time": 12.3,
        "prediction": prediction or {},
        "result_count": 0,
        "unique_id": "1f0b6b76-0c8e-4b5d-9d8b-2f52a5f1c0de",
        "import_id": None,
        "last_action": None,
        "bulk_created": False,
        "task": task_id,
        "project": PROJECT["id"],
        "updated_by": 1,
        "parent_prediction": None,
        "parent_annotation": None,
        "last_created_by": None,
        "completed_by": completed_by,
    }


def created(
    ann: dict[str, Any], tsk: dict[str, Any] | None, action: str = "ANNOTATION_CREATED"
) -> dict[str, Any]:
    body: dict[str, Any] = {"action": action, "annotation": ann, "project": PROJECT}
    if tsk is not None:
        body["task"] = tsk
    return body


def bulk_created(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    return {
        "action": "ANNOTATIONS_CREATED",
        "annotation": [a for a, _ in pairs],
        "project": PROJECT,
        "task": [t for _, t in pairs],
    }


def deleted(*annotation_ids: int) -> dict[str, Any]:
    return {
        "action": "ANNOTATIONS_DELETED",
        "annotations": [{"id": i} for i in annotation_ids],
        "project": PROJECT,
    }
