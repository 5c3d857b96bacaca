"""Label Studio's ML backend API under ``/label-studio``: a thin front on the ``Predictor``.

Point Label Studio's model URL at ``http://<bff>/label-studio`` (the default model line) or
``http://<bff>/label-studio/lines/<model line>``, with basic auth.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path

from flywheel_contracts.events import SLUG
from flywheel_inference_bff.api.deps import LabelStudio, PredictorDep, SettingsDep, require_json
from flywheel_inference_bff.api.schemas import SERVING_ERRORS
from flywheel_inference_bff.labelstudio import (
    LSPredictRequest,
    LSSetupRequest,
    ls_prediction,
    parse_label_config,
    task_images,
)
from flywheel_inference_bff.service import ItemFailure, PredictOptions
from flywheel_inference_bff.settings import BffSettings
from flywheel_runtime.http import error_responses

PREFIX = "/label-studio"
LINE_PREFIX = f"{PREFIX}/lines/{{model_line}}"

router = APIRouter(tags=["label-studio"])

LineParam = Annotated[str, Path(pattern=SLUG, description="Model line.")]


@router.get(f"{PREFIX}/health")
@router.get(f"{LINE_PREFIX}/health")
async def health() -> dict[str, str]:
    """Label Studio's liveness probe of an ML backend."""
    return {"status": "UP", "model_class": "FlywheelInferenceBFF"}


@router.post(
    f"{PREFIX}/setup", dependencies=[Depends(require_json)], responses=error_responses(404)
)
async def setup(
    body: LSSetupRequest, predictor: PredictorDep, settings: SettingsDep, _: LabelStudio
) -> dict[str, str]:
    """Label Studio connecting a project: the label config is checked, the version named."""
    return await _setup(body, predictor, settings, settings.default_model_line)


@router.post(
    f"{LINE_PREFIX}/setup", dependencies=[Depends(require_json)], responses=error_responses(404)
)
async def setup_line(
    model_line: LineParam,
    body: LSSetupRequest,
    predictor: PredictorDep,
    settings: SettingsDep,
    _: LabelStudio,
) -> dict[str, str]:
    """``setup`` for a named model line."""
    return await _setup(body, predictor, settings, model_line)


@router.post(f"{PREFIX}/predict", dependencies=[Depends(require_json)], responses=SERVING_ERRORS)
async def predict(
    body: LSPredictRequest, predictor: PredictorDep, settings: SettingsDep, _: LabelStudio
) -> dict[str, list[dict[str, Any]]]:
    """Pre-annotations for Label Studio tasks, one per task, in Label Studio's shape."""
    return await _predict(body, predictor, settings, settings.default_model_line)


@router.post(
    f"{LINE_PREFIX}/predict", dependencies=[Depends(require_json)], responses=SERVING_ERRORS
)
async def predict_line(
    model_line: LineParam,
    body: LSPredictRequest,
    predictor: PredictorDep,
    settings: SettingsDep,
    _: LabelStudio,
) -> dict[str, list[dict[str, Any]]]:
    """``predict`` for a named model line."""
    return await _predict(body, predictor, settings, model_line)


async def _setup(
    body: LSSetupRequest, predictor: PredictorDep, settings: BffSettings, model_line: str
) -> dict[str, str]:
    parse_label_config(
        body.label_schema,
        default_image_field=settings.label_studio_image_field,
        field="schema",
    )
    champion = await predictor.routing.champion(model_line)
    return {"model_version": champion.version}


async def _predict(
    body: LSPredictRequest, predictor: PredictorDep, settings: BffSettings, model_line: str
) -> dict[str, list[dict[str, Any]]]:
    config = parse_label_config(
        body.label_config, default_image_field=settings.label_studio_image_field
    )
    images = task_images(body.tasks, config, settings.data_bucket)
    if not images:
        return {"results": []}
    options = PredictOptions(model_line=model_line, top_k=1)
    outcomes = await predictor.predict_many(images, options)
    for outcome in outcomes:
        if isinstance(outcome, ItemFailure):
            raise outcome.error
    return {
        "results": [
            ls_prediction(outcome, config)
            for outcome in outcomes
            if not isinstance(outcome, ItemFailure)
        ]
    }
