"""A model line that brings its own model: the whole loop with the example training script.

The line's champion is the reference kind (DigitNet, 28 x 28 grayscale, MNIST statistics, no
``model.json``). trainer-dispatch's settings point the line at
``examples/bring-your-own-model/train_tiny_convnet.py``, a script that imports nothing from
Flywheel but the DDP helper and trains another architecture on another input: 32 x 32 RGB,
bicubic, mean/std 0.5. Labels → threshold → that script → model.trained → validation (each
version scored with its own preprocessing) → canary 10 → 50 → 100 % with both versions served
side by side by one Triton model → promoted, and the BFF answers with the new version, which
only works if it prepares each request the way that version declared.
"""

import json
from pathlib import Path

import pytest

from flywheel_contracts import (
    CanaryOutcome,
    ModelTrainedV1,
    ModelValidatedV1,
    RolloutStepV1,
    ThresholdReachedV1,
    ValidationVerdict,
)
from flywheel_data_monitor.main import create_app as create_data_monitor
from flywheel_serving.triton import TritonServer
from flywheel_trainer_dispatch.main import create_app as create_trainer_dispatch
from flywheel_trainer_dispatch.settings import LineTraining
from flywheel_validator.main import create_app as create_validator
from flywheel_vision.contract import read_signature

from .conftest import (
    LOOP_EVENTS,
    PROMOTING_POLICY,
    LabelingTool,
    Loop,
    create_project,
    post_mnist,
    steps_of,
    verdicts,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

EXAMPLE = (
    Path(__file__).resolve().parents[2]
    / "examples"
    / "bring-your-own-model"
    / "train_tiny_convnet.py"
)
LABELS = 400
"""As in the reference loop test: a test split of ~40 images, a few hundred to train on."""


async def test_a_line_with_its_own_training_script_and_preprocessing_goes_through_the_loop(
    loop: Loop, mlflow_tracking_uri: str, triton_server: TritonServer, tmp_path: Path
) -> None:
    champion, probe = await loop.bootstrap(mlflow_tracking_uri, triton_server, *LOOP_EVENTS)
    rollout = await loop.start_rollout(triton_server, PROMOTING_POLICY)
    bff = await loop.start_bff(triton_server)
    await loop.start(create_validator(loop.validator_settings()))
    line = LineTraining(
        entry_point=str(EXAMPLE),
        hyperparameters={"epochs": 5, "batch_size": 32, "lr": 3e-3},
    )
    await loop.start(
        create_trainer_dispatch(
            loop.trainer_settings(tmp_path / "runs", model_lines={loop.model_line: line})
        )
    )
    await loop.start(create_data_monitor(loop.data_monitor_settings()))
    labeling = await loop.start_labeling()
    await create_project(labeling, loop, count=LABELS)
    tool = await loop.stack.enter_async_context(LabelingTool(loop, bff.client, labeling))
    await tool.served(champion, n=5)

    await post_mnist(labeling, loop, LABELS)

    await probe.wait(ThresholdReachedV1, timeout=60)
    [trained] = await probe.wait(ModelTrainedV1, timeout=180)
    candidate = trained.payload.model_version
    [validated] = await probe.wait(ModelValidatedV1, timeout=120)
    assert validated.payload.verdict is ValidationVerdict.PASSED, validated.payload.reasons
    assert validated.payload.champion_version == champion
    assert any("parity not applicable" in reason for reason in validated.payload.reasons)

    # The version carries its declaration, with the names serving uses.
    client = loop.mlflow()
    run = client.get_run(trained.payload.mlflow_run_id)
    assert run.data.tags["entry_point"] == str(EXAMPLE)
    assert run.data.params["architecture"] == "TinyConvNet"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == list(
        range(5)
    )
    local = Path(client.download_artifacts(run.info.run_id, "model", str(tmp_path)))
    signature = read_signature((local / "model.json").read_bytes())
    assert signature.preprocessing.input_shape == (3, 32, 32)
    assert (signature.input.name, signature.output.name) == ("image", "logits")
    assert json.loads((local / "labels.json").read_text())["classes"] == [str(d) for d in range(10)]

    [verdict] = await verdicts(probe, rollout.client, loop)
    assert verdict.payload.verdict is CanaryOutcome.PROMOTED, verdict.payload.reasons
    assert verdict.payload.candidate_version == candidate
    assert steps_of(probe.of(RolloutStepV1)) == [(10, 1), (50, 2), (100, 3)]
    assert loop.alias("champion") == candidate
    # One Triton model serves both shapes: the dimensions they do not share are variable.
    config = (triton_server.repository / loop.model_line / "config.pbtxt").read_text()
    assert "dims: [ -1, -1, -1 ]" in config or "dims: [ 3, 32, 32 ]" in config
    await tool.served(candidate, n=10)
    answers = [a for a in tool.answers[-20:] if a.model_version == candidate]
    correct = sum(a.predicted_class == a.true_class for a in answers)
    assert correct / len(answers) >= 0.5, answers
