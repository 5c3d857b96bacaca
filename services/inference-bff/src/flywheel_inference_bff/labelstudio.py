"""Label Studio's ML backend protocol, read and written in Label Studio's own shapes.

Label Studio (``label_studio_ml/api.py`` of label-studio-ml-backend) posts
``/predict`` with ``{"tasks": [{"id", "data": {"image": ...}}], "label_config", "project",
"params"}`` and expects ``{"results": [one prediction per task, in order]}``, each prediction
``{"model_version", "score", "result": [regions]}``; a classification region is
``{"from_name": <Choices name>, "to_name": <Image name>, "type": "choices",
"value": {"choices": [class]}}``. ``/setup`` gets ``{"project", "schema"}`` and answers
``{"model_version"}``; ``/health`` answers ``{"status": "UP"}``.

The region names and the task's image key come from the project's label config
(``<Choices name="choice" toName="image">`` and ``<Image name="image" value="$image">``).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from flywheel_inference_bff.errors import FieldError
from flywheel_inference_bff.inputs import ImageRef, task_image
from flywheel_inference_bff.service import Prediction

MAX_LABEL_CONFIG = 200_000
"""Longest label config parsed, in characters; real ones are a few hundred."""

OBJECT_TAGS = frozenset({"image", "hypertextlabels", "text"})


class InvalidLabelConfigError(FieldError):
    code = "invalid_label_config"


@dataclass(frozen=True)
class LabelConfig:
    """What a prediction needs from a project's label config."""

    from_name: str = "choice"
    """``name`` of the ``<Choices>`` tag the prediction fills."""
    to_name: str = "image"
    """``toName`` of that tag: the ``<Image>`` it describes."""
    image_field: str = "image"
    """Key of the image in a task's ``data`` (``$image`` in ``<Image value="$image">``)."""
    choices: tuple[str, ...] = ()


class _Lenient(BaseModel):
    # Label Studio adds fields release after release; only the ones read here must be there.
    model_config = ConfigDict(extra="ignore", frozen=True)


class LSTask(_Lenient):
    id: int | str | None = None
    data: dict[str, Any] = {}


class LSPredictRequest(_Lenient):
    tasks: list[LSTask]
    label_config: str | None = None
    project: str | None = None
    model_version: str | None = None
    params: dict[str, Any] | None = None


class LSSetupRequest(_Lenient):
    project: str | int | None = None
    label_schema: str | None = Field(default=None, alias="schema")
    """The project's label config."""
    model_version: str | None = None


def parse_label_config(
    config: str | None, *, default_image_field: str = "image", field: str = "label_config"
) -> LabelConfig:
    """The ``<Choices>`` tag and the image it describes; defaults when there is no config."""
    if not config:
        return LabelConfig(image_field=default_image_field)
    if len(config) > MAX_LABEL_CONFIG:
        raise InvalidLabelConfigError("the label config is too long", field=field)
    try:
        # expat (2.4.1+) refuses entity-expansion bombs and never fetches external entities.
        root = ET.fromstring(config)  # noqa: S314 - see above; the size is bounded too
    except ET.ParseError as error:
        raise InvalidLabelConfigError(
            f"the label config is not XML: {error}", field=field
        ) from error
    choices = next((tag for tag in root.iter() if tag.tag.lower() == "choices"), None)
    if choices is None or not choices.get("name") or not choices.get("toName"):
        raise InvalidLabelConfigError(
            "the label config has no <Choices name=... toName=...> tag to predict", field=field
        )
    to_name = choices.get("toName", "").split(",")[0].strip()
    target = next(
        (
            tag
            for tag in root.iter()
            if tag.tag.lower() in OBJECT_TAGS and tag.get("name") == to_name
        ),
        None,
    )
    value = (target.get("value") if target is not None else None) or f"${default_image_field}"
    if not value.startswith("$") or len(value) < 2:
        raise InvalidLabelConfigError(
            f"the <{target.tag if target is not None else 'Image'} name={to_name!r}> tag takes "
            "its image from a literal, not from task data",
            field=field,
        )
    return LabelConfig(
        from_name=choices.get("name", ""),
        to_name=to_name,
        image_field=value[1:],
        choices=tuple(c.get("value", "") for c in choices.iter() if c.tag.lower() == "choice"),
    )


def task_images(tasks: list[LSTask], config: LabelConfig, data_bucket: str) -> list[ImageRef]:
    """Each task's image; a task whose image is not ours to read fails the request, named."""
    return [
        task_image(
            task.data.get(config.image_field),
            data_bucket,
            field=f"tasks.{index}.data.{config.image_field}",
        )
        for index, task in enumerate(tasks)
    ]


def ls_prediction(prediction: Prediction, config: LabelConfig) -> dict[str, Any]:
    """One task's prediction in Label Studio's shape; the region id is the BFF's prediction
    id, so an annotation made from it can be traced back to ``inference.logged``."""
    score = round(prediction.confidence, 6)
    return {
        "model_version": prediction.model_version,
        "score": score,
        "result": [
            {
                "id": str(prediction.prediction_id),
                "from_name": config.from_name,
                "to_name": config.to_name,
                "type": "choices",
                "value": {"choices": [prediction.predicted_class]},
                "score": score,
            }
        ],
    }
