import math
import uuid
from datetime import UTC, datetime

import numpy as np
import pytest

from flywheel_contracts import ProjectConfiguredV1, RolloutStepV1
from flywheel_contracts.datasets import image_key
from flywheel_inference_bff.errors import (
    ImageNotFoundError,
    InferenceUnavailableError,
    InvalidImageError,
    ModelLineNotFoundError,
    ModelNotReadyError,
    ModelUnusableError,
)
from flywheel_inference_bff.inputs import ImageBytes, StoredImage
from flywheel_inference_bff.scoring import softmax
from flywheel_inference_bff.service import ItemFailure, Prediction, PredictOptions, Target
from flywheel_runtime.errors import DependencyUnavailableError
from flywheel_vision.contract import ModelSignature, TensorSpec
from flywheel_vision.preprocess import MNIST_PREPROCESS, PreprocessSpec, preprocess

from ..conftest import digit_image
from ..fakes import MODEL, counter, settle, version_logits, world

OPTIONS = PredictOptions(model_line=MODEL, top_k=3)
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def step(percent: int, sequence: int = 1, candidate: str = "2") -> RolloutStepV1:
    return RolloutStepV1.model_validate(
        {
            "occurred_at": T0,
            "payload": {
                "rollout_id": uuid.UUID(int=1),
                "project_id": "digits",
                "model_line": MODEL,
                "registered_model": MODEL,
                "candidate_version": candidate,
                "champion_version": "1",
                "step": 1,
                "traffic_percent": percent,
                "previous_percent": 0,
                "sequence": sequence,
            },
        }
    )


def png(seed: int) -> ImageBytes:
    return ImageBytes(digit_image(seed), "image")


def expected(version: str, data: bytes) -> list[float]:
    logits = version_logits(version, preprocess(data)[np.newaxis])
    return [float(p) for p in softmax(logits)[0]]


async def test_the_champion_answers_with_softmax_top_k_and_the_prediction_is_logged() -> None:
    w = world(project_ids={MODEL: "digits"})
    w.serve("1", champion=True)
    image = png(1)

    prediction = await w.predictor.predict(image, OPTIONS)

    probabilities = expected("1", image.data)
    assert (prediction.registered_model, prediction.model_version) == (MODEL, "1")
    assert [c.score for c in prediction.classes] == pytest.approx(sorted(probabilities)[::-1][:3])
    assert prediction.predicted_class == str(int(np.argmax(probabilities)))
    assert prediction.latency_ms >= 0
    [logged] = w.log.events
    payload = logged.payload
    assert payload.request_id == prediction.prediction_id
    assert (payload.project_id, payload.model_version, payload.status) == ("digits", "1", "ok")
    assert payload.predicted_class == prediction.predicted_class
    assert payload.confidence == pytest.approx(prediction.confidence)
    assert payload.input_sha256 == prediction.input_sha256
    assert payload.route == "online"


async def test_weights_split_traffic_and_a_routing_key_is_sticky() -> None:
    w = world()
    w.serve("1", champion=True)
    w.serve("2")
    await w.routing.rollout_step(step(10))
    n = 2000

    outcomes = await w.predictor.predict_many([png(i % 50) for i in range(n)], OPTIONS)
    keyed = [
        await w.predictor.predict(png(1), PredictOptions(MODEL, 1, routing_key="user-42"))
        for _ in range(20)
    ]

    versions = [o.model_version for o in outcomes if isinstance(o, Prediction)]
    assert versions.count("2") / n == pytest.approx(0.1, abs=4 * math.sqrt(0.09 / n))
    assert len({p.model_version for p in keyed}) == 1
    # One Triton call per chunk of 4 and version.
    assert all(size <= 4 for _, _, size in w.inference.calls)


async def test_the_champion_alias_is_cached_and_a_stale_one_serves_while_the_registry_is_down() -> (
    None
):
    w = world()
    w.serve("1", champion=True)

    await w.predictor.predict(png(1), OPTIONS)
    await w.predictor.predict(png(2), OPTIONS)
    reads = w.registry.alias_reads
    w.registry.down = True
    w.routing._champions[MODEL].read_at -= 3600  # the TTL has passed
    served = await w.predictor.predict(png(3), OPTIONS)

    assert reads == 1
    assert served.model_version == "1"


async def test_an_unknown_model_line_is_not_found_and_a_registry_outage_is_503() -> None:
    w = world()

    with pytest.raises(ModelLineNotFoundError) as unknown:
        await w.predictor.predict(png(1), PredictOptions("no-such-line", 1))
    w.registry.down = True
    with pytest.raises(DependencyUnavailableError):
        await w.predictor.predict(png(1), OPTIONS)

    assert unknown.value.http_status == 404
    assert w.log.events == []


async def test_a_line_maps_to_its_registered_model() -> None:
    w = world(registered_models={"digits": MODEL})
    w.serve("1", champion=True)

    prediction = await w.predictor.predict(png(1), PredictOptions("digits", 1))

    assert (prediction.model_line, prediction.registered_model) == ("digits", MODEL)
    assert w.inference.calls == [(MODEL, "1", 1)]


async def test_bad_images_fail_alone_naming_their_field_and_are_logged_as_errors() -> None:
    w = world()
    w.serve("1", champion=True)
    stored = w.images.add(digit_image(9))
    images = [
        png(1),
        ImageBytes(b"not an image", "images.1.image_b64"),
        StoredImage("images/00/missing", "images.2.s3_key"),
        ImageBytes(digit_image(3)[:60], "images.3.image_b64"),  # truncated inside its pixels
        StoredImage(stored, "images.4.s3_key"),
    ]

    outcomes = await w.predictor.predict_many(images, OPTIONS)

    kinds = [type(o).__name__ for o in outcomes]
    assert kinds == ["Prediction", "ItemFailure", "ItemFailure", "ItemFailure", "Prediction"]
    failures = [o for o in outcomes if isinstance(o, ItemFailure)]
    assert [f.error.field for f in failures] == [
        "images.1.image_b64",
        "images.2.s3_key",
        "images.3.image_b64",
    ]
    assert isinstance(failures[0].error, InvalidImageError)
    assert isinstance(failures[1].error, ImageNotFoundError)
    statuses = [(e.payload.status, e.payload.error_code) for e in w.log.events]
    # The missing image never arrived: there is nothing to name it by, so no log.
    assert sorted(statuses, key=str) == sorted(
        [("ok", None), ("error", "invalid_image"), ("error", "invalid_image"), ("ok", None)],
        key=str,
    )
    with pytest.raises(InvalidImageError):
        await w.predictor.predict(ImageBytes(b"garbage", "image"), OPTIONS)


async def test_serving_trouble_fails_the_call_and_every_image_is_logged_as_an_error() -> None:
    w = world()
    w.serve("1", champion=True)
    w.inference.loaded.clear()

    with pytest.raises(ModelNotReadyError) as not_ready:
        await w.predictor.predict_many([png(1), png(2)], OPTIONS)
    w.inference.down = True
    with pytest.raises(InferenceUnavailableError):
        await w.predictor.predict(png(3), OPTIONS)

    assert not_ready.value.http_status == 503
    assert [e.payload.error_code for e in w.log.events] == [
        "model_not_ready",
        "model_not_ready",
        "inference_unavailable",
    ]
    # Only Triton away is marked: a version not loaded is that version's trouble.
    assert [e.payload.serving_unavailable for e in w.log.events] == [False, False, True]
    assert (
        counter(
            w.metrics,
            "flywheel_bff_predictions_total",
            model_version="1",
            status="error:model_not_ready",
        )
        == 2
    )


async def test_logits_that_do_not_fit_the_registered_classes_are_a_deployment_fault() -> None:
    w = world()
    w.serve("1", champion=True)
    w.inference.classes = 7

    with pytest.raises(ModelUnusableError, match=r"shape \[1, 7\]"):
        await w.predictor.predict(png(1), OPTIONS)


async def test_a_cached_answer_skips_triton_and_equals_the_fresh_one() -> None:
    w = world()
    w.serve("1", champion=True)

    fresh = await w.predictor.predict(png(1), OPTIONS)
    await settle()
    cached = await w.predictor.predict(png(1), OPTIONS)

    assert len(w.inference.calls) == 1
    assert (fresh.cached, cached.cached) == (False, True)
    assert cached.classes == fresh.classes
    assert cached.prediction_id != fresh.prediction_id


async def test_a_pinned_version_ignores_routing() -> None:
    w = world()
    w.serve("1", champion=True)
    w.serve("3")
    await w.routing.rollout_step(step(100, candidate="1"))

    outcomes = await w.predictor.predict_many(
        [png(i) for i in range(5)],
        PredictOptions(MODEL, 1, route="batch", target=Target(MODEL, MODEL, "3")),
    )

    assert {o.model_version for o in outcomes if isinstance(o, Prediction)} == {"3"}
    assert {e.payload.route for e in w.log.events} == {"batch"}


async def test_routing_is_stored_for_later_replicas_and_restored() -> None:
    first = world()
    await first.routing.rollout_step(step(30))
    await first.routing.project_configured(
        ProjectConfiguredV1.model_validate(
            {
                "payload": {
                    "project_id": "digits",
                    "model_line": MODEL,
                    "task_type": "classification",
                    "class_names": ["0"],
                    "policy": {},
                    "revision": 1,
                }
            }
        )
    )
    later = world()
    later.routes.routes = first.routes.routes
    later.routes.projects = first.routes.projects

    await later.routing.restore()

    route = later.routing.route(MODEL)
    assert route is not None
    assert route.candidate_percent == 30
    assert later.routing.project_for(MODEL) == "digits"


async def test_an_unreachable_database_does_not_stop_the_weights_from_applying() -> None:
    w = world()
    w.routes.down = True

    applied = await w.routing.rollout_step(step(40))
    await w.routing.restore()

    route = w.routing.route(MODEL)
    assert applied
    assert route is not None
    assert route.candidate_percent == 40


async def test_with_no_champion_anywhere_the_candidate_serves_everything() -> None:
    w = world()
    w.serve("2")
    rollout = step(10, candidate="2").model_copy(
        update={
            "payload": step(10, candidate="2").payload.model_copy(update={"champion_version": None})
        }
    )
    await w.routing.rollout_step(rollout)

    outcomes = await w.predictor.predict_many([png(i) for i in range(20)], OPTIONS)

    assert {o.model_version for o in outcomes if isinstance(o, Prediction)} == {"2"}


async def test_each_version_is_prepared_the_way_its_model_json_declares() -> None:
    w = world()
    w.serve("1", champion=True)
    w.serve("2")
    rgb = PreprocessSpec(height=32, width=32, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    w.registry.model_json[(MODEL, "2")] = (
        ModelSignature(
            inputs=(TensorSpec(name="image", shape=(-1, 3, 32, 32)),),
            outputs=(TensorSpec(name="logits", shape=(-1, 10)),),
            preprocessing=rgb,
        )
        .model_dump_json()
        .encode()
    )

    for version in ("1", "2"):
        await w.predictor.predict_many(
            [png(i) for i in range(3)],
            PredictOptions(MODEL, 1, target=Target(MODEL, MODEL, version)),
        )

    assert w.inference.shapes == [("1", (3, 1, 28, 28)), ("2", (3, 3, 32, 32))]


async def test_a_version_whose_model_json_is_broken_is_a_deployment_fault() -> None:
    w = world()
    w.serve("1", champion=True)
    w.registry.model_json[(MODEL, "1")] = b'{"inputs": []}'

    with pytest.raises(ModelUnusableError, match="declares no usable preprocessing"):
        await w.predictor.predict(png(1), OPTIONS)


def _declaring_embedding(size: int) -> bytes:
    return (
        ModelSignature(
            inputs=(TensorSpec(name="image", shape=(-1, 1, 28, 28)),),
            outputs=(TensorSpec(name="logits", shape=(-1, 10)),),
            embedding=TensorSpec(name="embedding", shape=(-1, size)),
            preprocessing=MNIST_PREPROCESS,
        )
        .model_dump_json()
        .encode()
    )


async def test_drift_features_and_the_kept_input_go_with_the_log() -> None:
    w = world(drift=True)
    w.serve("1", champion=True)
    w.registry.model_json[(MODEL, "1")] = _declaring_embedding(2)
    image = png(3)

    prediction = await w.predictor.predict(image, OPTIONS)
    await w.predictor.close()

    [logged] = w.log.events
    payload = logged.payload
    assert payload.image_stats is not None
    assert (payload.image_stats.width, payload.image_stats.height) == (28, 28)
    assert 0 < payload.image_stats.brightness < 0.5, "a dark digit on black"
    tensor = preprocess(image.data)
    assert payload.embedding == pytest.approx([tensor.mean(), tensor.std()], abs=1e-4)
    assert payload.input_key == image_key(prediction.input_sha256)
    assert w.inputs.kept == {payload.input_key: image.data}


async def test_a_version_without_an_embedding_logs_statistics_only() -> None:
    w = world(drift=True)
    w.serve("1", champion=True)

    await w.predictor.predict(png(4), OPTIONS)

    [logged] = w.log.events
    assert logged.payload.embedding is None
    assert logged.payload.image_stats is not None
    assert w.inference.calls == [(MODEL, "1", 1)]


async def test_without_drift_features_nothing_is_computed_or_kept() -> None:
    w = world()
    w.serve("1", champion=True)
    w.registry.model_json[(MODEL, "1")] = _declaring_embedding(2)

    await w.predictor.predict(png(5), OPTIONS)

    [logged] = w.log.events
    assert (logged.payload.embedding, logged.payload.image_stats) == (None, None)
    assert logged.payload.input_key is None
    assert w.inputs.kept == {}
