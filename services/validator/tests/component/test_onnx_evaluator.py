import io
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from flywheel_clients.registry import ModelFiles
from flywheel_validator.adapters.onnx import OnnxEvaluator
from flywheel_validator.errors import ModelUnusableError
from flywheel_validator.ports import LabeledImage
from flywheel_vision.contract import ModelSignature, TensorSpec, reference_signature
from flywheel_vision.data import load_mnist, mnist_dataset, to_png
from flywheel_vision.export import export_onnx
from flywheel_vision.model import EMBEDDING_SIZE, DigitNet
from flywheel_vision.preprocess import PreprocessSpec, image_statistics, preprocess_batch

CLASSES = [str(d) for d in range(10)]
# A derangement: output j of the reordered model means class PERMUTATION[j].
PERMUTATION = [3, 7, 0, 9, 1, 8, 2, 6, 4, 5]


@dataclass(frozen=True)
class Trained:
    model: DigitNet
    files: ModelFiles
    images: list[LabeledImage]


def _state_bytes(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def _files(model: nn.Module, labels: list[str], version: str = "1") -> ModelFiles:
    return ModelFiles(
        name="digits",
        version=version,
        onnx=export_onnx(model),
        labels=labels,
        state_dict=_state_bytes(model),
    )


@pytest.fixture(scope="module")
def trained() -> Trained:
    """A DigitNet trained briefly on MNIST, exported, and 300 held-out digits as PNGs."""
    torch.manual_seed(0)
    model = DigitNet(10)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    loader = torch.utils.data.DataLoader(mnist_dataset("train", 3000), batch_size=64, shuffle=True)
    model.train()
    for _ in range(2):
        for images, labels in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
    model.eval()
    pixels, labels = load_mnist("test", 300)
    images = [
        LabeledImage(class_name=str(int(label)), data=to_png(image))
        for image, label in zip(pixels, labels, strict=True)
    ]
    return Trained(model, _files(model, CLASSES), images)


@pytest.fixture
def evaluator() -> OnnxEvaluator:
    return OnnxEvaluator(latency_images=20, parity_images=8)


async def test_a_model_is_scored_as_deployed(trained: Trained, evaluator: OnnxEvaluator) -> None:
    scored = await evaluator.score(trained.files, trained.images)

    assert scored.test_images == 300
    assert scored.accuracy > 0.8
    assert scored.macro_f1 > 0.8
    assert sorted(scored.per_class_recall) == CLASSES
    assert 0 < scored.latency_p50_ms <= scored.latency_p95_ms
    assert scored.model_size_bytes == len(trained.files.onnx)
    assert scored.unknown_class_images == 0


async def test_a_model_with_another_class_order_is_scored_by_class_name(
    trained: Trained, evaluator: OnnxEvaluator
) -> None:
    reordered = DigitNet(10)
    reordered.load_state_dict(trained.model.state_dict())
    with torch.no_grad():
        reordered.head.weight.copy_(trained.model.head.weight[PERMUTATION])
        reordered.head.bias.copy_(trained.model.head.bias[PERMUTATION])
    labels = [CLASSES[i] for i in PERMUTATION]
    files = _files(reordered, labels, version="2")

    original = await evaluator.score(trained.files, trained.images)
    by_name = await evaluator.score(files, trained.images)
    by_index = await evaluator.score(files.model_copy(update={"labels": CLASSES}), trained.images)

    assert by_name.accuracy == pytest.approx(original.accuracy)
    assert by_name.macro_f1 == pytest.approx(original.macro_f1)
    assert by_name.per_class_recall == pytest.approx(original.per_class_recall)
    # Read by output index instead of by name, the same model would look useless.
    assert by_index.accuracy < 0.2


async def test_images_of_classes_the_model_does_not_know_are_errors(
    trained: Trained, evaluator: OnnxEvaluator
) -> None:
    foreign = [LabeledImage(class_name="x", data=i.data) for i in trained.images[:30]]

    scored = await evaluator.score(trained.files, [*trained.images, *foreign])
    plain = await evaluator.score(trained.files, trained.images)

    assert scored.test_images == 330
    assert scored.accuracy == pytest.approx(plain.accuracy * 300 / 330)
    assert scored.per_class_recall["x"] == 0.0
    assert (scored.unknown_class_images, scored.unknown_classes) == (30, ["x"])


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"onnx": b"not an onnx graph"}, "protobuf"),
        ({"labels": CLASSES[:9]}, "10 outputs but 9 classes"),
        ({"labels": ["0", "0", *CLASSES[2:]]}, "twice"),
    ],
)
async def test_a_model_that_does_not_load_or_fit_its_labels_is_unusable(
    trained: Trained, evaluator: OnnxEvaluator, update: dict[str, object], message: str
) -> None:
    broken = trained.files.model_copy(update=update)

    with pytest.raises(ModelUnusableError, match=message):
        await evaluator.score(broken, trained.images)


async def test_parity_of_the_exported_weights_is_measured(
    trained: Trained, evaluator: OnnxEvaluator
) -> None:
    parity = await evaluator.parity(trained.files, trained.images)

    assert parity.error is None
    assert parity.max_abs_diff is not None
    assert parity.max_abs_diff < 1e-4
    assert parity.images == 8


async def test_weights_that_are_not_the_exported_ones_show_as_a_large_difference(
    trained: Trained, evaluator: OnnxEvaluator
) -> None:
    torch.manual_seed(1)
    other = trained.files.model_copy(update={"state_dict": _state_bytes(DigitNet(10))})

    parity = await evaluator.parity(other, trained.images)

    assert parity.max_abs_diff is not None
    assert parity.max_abs_diff > 1e-2


@pytest.mark.parametrize(
    ("state_dict", "error"),
    [
        (None, "the version has no state dict"),
        (b"garbage", "state dict does not load into DigitNet"),
        (_state_bytes(DigitNet(9)), "state dict does not load into DigitNet"),
    ],
)
async def test_parity_that_cannot_run_says_why(
    trained: Trained, evaluator: OnnxEvaluator, state_dict: bytes | None, error: str
) -> None:
    parity = await evaluator.parity(
        trained.files.model_copy(update={"state_dict": state_dict}), trained.images
    )

    assert parity.max_abs_diff is None
    assert parity.error is not None
    assert parity.error.startswith(error)


class _RgbLinear(nn.Module):
    """Another architecture on another input: RGB 16 x 16."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 16 * 16, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.linear(image.flatten(1))
        return logits


async def test_a_model_of_its_own_is_scored_with_its_declared_preprocessing(
    trained: Trained, evaluator: OnnxEvaluator
) -> None:
    signature = ModelSignature(
        architecture="RgbLinear",
        inputs=(TensorSpec(name="image", shape=(-1, 3, 16, 16)),),
        outputs=(TensorSpec(name="logits", shape=(-1, 10)),),
        preprocessing=PreprocessSpec(
            height=16, width=16, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3
        ),
    )
    files = ModelFiles(
        name="digits",
        version="2",
        onnx=export_onnx(_RgbLinear(), input_shape=(3, 16, 16)),
        labels=CLASSES,
        model_json=signature.model_dump_json().encode(),
    )

    scored = await evaluator.score(files, trained.images)
    parity = await evaluator.parity(files, trained.images)

    assert scored.test_images == 300
    assert parity.not_applicable == "RgbLinear is not the reference DigitNet"
    assert parity.max_abs_diff is None
    broken = files.model_copy(update={"model_json": b"{}"})
    with pytest.raises(ModelUnusableError, match=r"model\.json"):
        await evaluator.score(broken, trained.images)


async def test_the_drift_reference_holds_predictions_embeddings_and_image_statistics(
    trained: Trained, evaluator: OnnxEvaluator
) -> None:
    declared = trained.files.model_copy(
        update={
            "model_json": reference_signature(10, embedding_size=EMBEDDING_SIZE)
            .model_dump_json()
            .encode()
        }
    )

    reference = await evaluator.describe(declared, trained.images)

    assert len(reference.predicted) == 300
    right = sum(p == i.class_name for p, i in zip(reference.predicted, trained.images, strict=True))
    assert right / 300 > 0.8
    assert reference.embeddings is not None
    assert reference.embeddings.shape == (300, EMBEDDING_SIZE)
    pixels = torch.from_numpy(preprocess_batch([image.data for image in trained.images[:5]]))
    with torch.inference_mode():
        features = trained.model.features(pixels).numpy()
    assert np.allclose(reference.embeddings[:5], features, atol=1e-4)
    assert set(reference.statistics) == {"brightness", "contrast", "width", "height"}
    assert set(reference.statistics["width"]) == {28.0}
    first = image_statistics(trained.images[0].data)
    assert reference.statistics["brightness"][0] == first["brightness"]
    assert reference.statistics["contrast"][0] == first["contrast"]


async def test_a_version_that_declares_no_embedding_has_a_reference_without_one(
    trained: Trained, evaluator: OnnxEvaluator
) -> None:
    reference = await evaluator.describe(trained.files, trained.images[:20])

    assert reference.embeddings is None
    assert len(reference.predicted) == 20
    assert len(reference.statistics["height"]) == 20


async def test_a_reference_of_a_model_without_the_declared_embedding_is_refused(
    trained: Trained, evaluator: OnnxEvaluator
) -> None:
    logits_only = trained.files.model_copy(
        update={
            "onnx": export_onnx(trained.model, embedding=False),
            "model_json": reference_signature(10, embedding_size=EMBEDDING_SIZE)
            .model_dump_json()
            .encode(),
        }
    )

    with pytest.raises(ModelUnusableError, match="embedding"):
        await evaluator.describe(logits_only, trained.images[:4])
