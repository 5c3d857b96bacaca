from datetime import UTC, datetime

import pytest

from flywheel_labeling.labelstudio import InvalidWebhookError, ItemKind, parse_webhook

from ..labelstudio_payloads import PROJECT, annotation, bulk_created, created, deleted, task

IMAGE = "s3://flywheel-data/uploads/digit-1.png"


def test_annotation_created_becomes_one_label_with_its_image_and_labeler() -> None:
    webhook = parse_webhook(created(annotation(17, 5, ["7"]), task(5, IMAGE)))

    [item] = webhook.items
    assert webhook.single
    assert webhook.handled
    assert item.kind is ItemKind.UPSERT
    assert item.fields is not None
    assert item.fields.class_name == "7"
    assert item.fields.external_id == "label-studio:17"
    assert item.image_ref == IMAGE
    assert item.image_field == "task.data.image"
    assert item.labeler == "1"
    assert item.version is not None
    assert item.version.updated_at == datetime(2026, 1, 1, 10, 5, tzinfo=UTC)


def test_annotation_updated_reads_like_created() -> None:
    body = created(annotation(17, 5, ["1"]), task(5, IMAGE), action="ANNOTATION_UPDATED")

    [item] = parse_webhook(body).items

    assert item.kind is ItemKind.UPSERT
    assert item.fields is not None
    assert item.fields.class_name == "1"


def test_a_cancelled_annotation_is_skipped() -> None:
    [item] = parse_webhook(created(annotation(3, 5, [], was_cancelled=True), task(5, IMAGE))).items

    assert item.kind is ItemKind.CANCELLED


@pytest.mark.parametrize(
    ("choices", "message"), [(None, "no 'choices'"), (["1", "7"], "2 choices")]
)
def test_an_annotation_without_exactly_one_choice_is_rejected(
    choices: list[str] | None, message: str
) -> None:
    [item] = parse_webhook(created(annotation(3, 5, choices), task(5, IMAGE))).items

    assert item.kind is ItemKind.REJECTED
    assert item.error is not None
    assert message in item.error.message
    assert item.error.details["field"] == "annotation.result"


def test_bulk_annotations_are_matched_to_their_tasks_by_id() -> None:
    body = bulk_created(
        [
            (annotation(21, 8, ["0"]), task(8, "s3://flywheel-data/a.png")),
            (annotation(22, 9, ["7"]), task(9, "http://images.example/b.png")),
        ]
    )
    body["task"].reverse()

    webhook = parse_webhook(body)

    assert not webhook.single
    assert [(i.annotation_id, i.image_ref) for i in webhook.items] == [
        (21, "s3://flywheel-data/a.png"),
        (22, "http://images.example/b.png"),
    ]
    assert webhook.items[1].image_field == "task.0.data.image"


def test_deleted_annotations_name_their_ids() -> None:
    webhook = parse_webhook(deleted(17, 18))

    assert [(i.kind, i.annotation_id) for i in webhook.items] == [
        (ItemKind.DELETE, 17),
        (ItemKind.DELETE, 18),
    ]


@pytest.mark.parametrize("action", ["PROJECT_UPDATED", "TASKS_CREATED", "LABEL_LINK_CREATED"])
def test_other_actions_are_acknowledged_and_ignored(action: str) -> None:
    webhook = parse_webhook({"action": action, "project": PROJECT})

    assert not webhook.handled
    assert webhook.items == []


def test_a_payload_without_updated_at_names_the_field() -> None:
    ann = annotation(17, 5, ["7"])
    del ann["updated_at"]

    with pytest.raises(InvalidWebhookError) as raised:
        parse_webhook(created(ann, task(5, IMAGE)))

    assert raised.value.details["field"] == "annotation.updated_at"


def test_a_payload_without_action_is_refused() -> None:
    with pytest.raises(InvalidWebhookError, match="action"):
        parse_webhook({"annotation": annotation(1, 1, ["7"])})


def test_a_prediction_the_labeler_corrected_is_kept_as_the_prefill() -> None:
    prediction = {
        "id": 91,
        "result": [{"type": "choices", "value": {"choices": ["1"]}}],
        "score": 0.83,
        "model_version": "4",
    }

    [item] = parse_webhook(
        created(annotation(17, 5, ["7"], prediction=prediction), task(5, IMAGE))
    ).items

    assert item.fields is not None
    assert (item.fields.predicted_class, item.fields.model_version) == ("1", "4")
    assert (item.fields.confidence, item.fields.prediction_id) == (0.83, "91")


def test_an_older_release_without_the_task_block_gives_no_image() -> None:
    [item] = parse_webhook(created(annotation(17, 5, ["7"]), None)).items

    assert item.kind is ItemKind.UPSERT
    assert item.image_ref is None


def test_completed_by_as_a_user_object_gives_the_email() -> None:
    ann = annotation(17, 5, ["7"], completed_by={"id": 4, "email": "ann@example.com"})

    [item] = parse_webhook(created(ann, task(5, IMAGE))).items

    assert item.labeler == "ann@example.com"
