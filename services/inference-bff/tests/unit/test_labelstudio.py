import base64
import uuid

import pytest

from flywheel_inference_bff.errors import ImageSourceRefusedError
from flywheel_inference_bff.inputs import ImageBytes, StoredImage
from flywheel_inference_bff.labelstudio import (
    InvalidLabelConfigError,
    LabelConfig,
    LSPredictRequest,
    ls_prediction,
    parse_label_config,
    task_images,
)
from flywheel_inference_bff.scoring import ClassScore
from flywheel_inference_bff.service import Prediction

from ..conftest import digit_image

CONFIG = """
<View>
  <Image name="photo" value="$picture" zoom="true"/>
  <Choices name="digit" toName="photo" choice="single">
    <Choice value="0"/><Choice value="1"/><Choice value="7"/>
  </Choices>
</View>
"""


def test_region_names_and_the_image_key_come_from_the_label_config() -> None:
    config = parse_label_config(CONFIG)

    assert config == LabelConfig(
        from_name="digit", to_name="photo", image_field="picture", choices=("0", "1", "7")
    )


def test_without_a_label_config_the_defaults_apply() -> None:
    assert parse_label_config(None, default_image_field="img") == LabelConfig(image_field="img")
    assert parse_label_config("") == LabelConfig()


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ("<View><Image name='i'", "not XML"),
        ("<View><Image name='i' value='$image'/></View>", "no <Choices"),
        ("<View><Image name='i' value='a.png'/><Choices name='c' toName='i'/></View>", "literal"),
    ],
)
def test_a_label_config_without_something_to_predict_is_refused(config: str, reason: str) -> None:
    with pytest.raises(InvalidLabelConfigError, match=reason) as refused:
        parse_label_config(config, field="schema")

    assert refused.value.field == "schema"
    assert refused.value.http_status == 422


def test_task_images_are_read_from_the_configured_key_and_bad_ones_named() -> None:
    png = digit_image(1)
    request = LSPredictRequest.model_validate(
        {
            "tasks": [
                {"id": 1, "data": {"picture": "s3://flywheel-data/images/ab/abc"}},
                {
                    "id": 2,
                    "data": {"picture": "data:image/png;base64," + base64.b64encode(png).decode()},
                },
                {"id": 3, "data": {"picture": "http://label-studio:8080/data/upload/3.png"}},
            ],
            "label_config": CONFIG,
            "project": "3.1700000000",
            "params": {"context": None},
            "future_field": True,
        }
    )
    config = parse_label_config(request.label_config)

    with pytest.raises(ImageSourceRefusedError) as refused:
        task_images(request.tasks, config, "flywheel-data")
    images = task_images(request.tasks[:2], config, "flywheel-data")

    assert refused.value.field == "tasks.2.data.picture"
    assert images == [
        StoredImage("images/ab/abc", "tasks.0.data.picture"),
        ImageBytes(png, "tasks.1.data.picture"),
    ]


def test_a_prediction_maps_to_label_studios_shape() -> None:
    prediction_id = uuid.uuid4()
    prediction = Prediction(
        prediction_id=prediction_id,
        model_line="digits-classifier",
        registered_model="digits-classifier",
        model_version="4",
        classes=[ClassScore("7", 0.9123456789)],
        input_sha256="a" * 64,
        latency_ms=3.0,
    )

    shaped = ls_prediction(prediction, parse_label_config(CONFIG))

    assert shaped == {
        "model_version": "4",
        "score": 0.912346,
        "result": [
            {
                "id": str(prediction_id),
                "from_name": "digit",
                "to_name": "photo",
                "type": "choices",
                "value": {"choices": ["7"]},
                "score": 0.912346,
            }
        ],
    }
