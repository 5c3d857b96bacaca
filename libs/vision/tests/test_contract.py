import functools
import io
import json
import sys
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

from flywheel_vision.contract import (
    DistributedEnv,
    EntryPointOutputError,
    ModelSignature,
    Sample,
    TrainingContext,
    reference_signature,
    signature_or_reference,
)
from flywheel_vision.data import load_mnist, to_png
from flywheel_vision.entrypoints import DEFAULT_ENTRY_POINT, EntryPoint, EntryPointError
from flywheel_vision.export import export_onnx
from flywheel_vision.model import DigitNet
from flywheel_vision.outputs import read_outputs, smoke_test
from flywheel_vision.preprocess import MNIST_PREPROCESS, PreprocessSpec, preprocess

# torch.export's own pytree internals trip a deprecation of torch's; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

CLASSES = [str(d) for d in range(10)]
RGB32 = PreprocessSpec(
    height=32, width=32, channels=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="bicubic"
)


class Flat(nn.Module):
    """A linear model over RGB 32 x 32 images, with tensor names of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 32 * 32, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        scores: torch.Tensor = self.linear(pixels.flatten(1))
        return scores


class FlatWithFeatures(nn.Module):
    """``Flat`` with a hidden layer it also outputs, as its own ``features`` tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(3 * 32 * 32, 16)
        self.linear = nn.Linear(16, 10)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.relu(self.hidden(pixels.flatten(1)))
        return self.linear(features), features


@functools.cache
def _flat_with_features_onnx() -> bytes:
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        FlatWithFeatures().eval(),
        (torch.zeros(2, 3, 32, 32),),
        input_names=["pixels"],
        output_names=["scores", "features"],
        dynamic_shapes={"pixels": {0: batch}},
        dynamo=True,
        verbose=False,
    )
    assert program is not None
    serialized: bytes = program.model_proto.SerializeToString()
    return serialized


@functools.cache
def _flat_onnx(names: tuple[str, str] = ("pixels", "scores")) -> bytes:
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        Flat().eval(),
        (torch.zeros(2, 3, 32, 32),),
        input_names=[names[0]],
        output_names=[names[1]],
        dynamic_shapes={names[0]: {0: batch}},
        dynamo=True,
        verbose=False,
    )
    assert program is not None
    serialized: bytes = program.model_proto.SerializeToString()
    return serialized


def _signature(**changes: object) -> dict[str, object]:
    declared: dict[str, object] = {
        "architecture": "Flat",
        "inputs": [{"name": "pixels", "shape": [-1, 3, 32, 32]}],
        "outputs": [{"name": "scores", "shape": [-1, 10]}],
        "preprocessing": RGB32.model_dump(),
    }
    return declared | changes


def _leave(folder: Path, *, onnx: bytes | None = None, **files: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(onnx if onnx is not None else _flat_onnx())
    written = {"model.json": _signature(), "metrics.json": {"val_accuracy": [0.5, 0.7]}}
    for name, content in (written | files).items():
        path = folder / name.replace("_", ".", 1)
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
    return folder


def _digit_pngs(count: int) -> list[bytes]:
    images, _ = load_mnist("test", count)
    return [to_png(image) for image in images]


# --- preprocessing specs ------------------------------------------------------------------------


def test_the_mnist_spec_gives_exactly_what_the_reference_always_got() -> None:
    png = _digit_pngs(1)[0]

    gray = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32) / 255.0
    expected = ((gray - np.float32(0.1307)) / np.float32(0.3081)).reshape(1, 28, 28)

    assert np.array_equal(preprocess(png), expected.astype(np.float32))
    assert np.array_equal(preprocess(png, MNIST_PREPROCESS), preprocess(png))


def test_an_rgb_spec_resizes_converts_and_normalises_per_channel() -> None:
    picture = Image.new("RGB", (10, 20), (255, 0, 128))
    spec = PreprocessSpec(
        height=16, width=8, channels=3, mean=(0.5, 0.0, 0.25), std=(0.5, 1.0, 0.25)
    )

    tensor = preprocess(picture, spec)

    assert tensor.shape == (3, 16, 8)
    assert tensor.dtype == np.float32
    assert np.allclose(tensor[0], 1.0)
    assert np.allclose(tensor[1], 0.0)
    assert np.allclose(tensor[2], (128 / 255 - 0.25) / 0.25)


@pytest.mark.parametrize(
    "bad",
    [
        {"channels": 3, "mean": (0.5,), "std": (0.5,)},
        {"mean": (0.5,), "std": (0.0,)},
        {"height": 0},
        {"resize": "lanczos"},
    ],
)
def test_a_spec_refuses_statistics_that_do_not_fit_its_channels(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="validation error"):
        PreprocessSpec.model_validate({"height": 8, "width": 8} | bad)


# --- model.json ---------------------------------------------------------------------------------


def test_a_signature_must_agree_with_its_preprocessing() -> None:
    with pytest.raises(ValueError, match="preprocessing makes"):
        ModelSignature.model_validate(_signature(inputs=[{"name": "x", "shape": [-1, 1, 28, 28]}]))
    with pytest.raises(ValueError, match="number of classes"):
        ModelSignature.model_validate(_signature(outputs=[{"name": "y", "shape": [10]}]))


def test_an_embedding_is_optional_checked_and_renamed_by_canonical() -> None:
    plain = ModelSignature.model_validate(_signature())
    declared = ModelSignature.model_validate(
        _signature(embedding={"name": "features", "shape": [-1, 16]})
    )

    assert plain.embedding is None
    assert plain.embedding_size is None
    assert "embedding" not in plain.model_dump_json()  # model.json stays as it was before
    assert declared.embedding_size == 16
    assert declared.canonical().embedding == declared.embedding.model_copy(  # type: ignore[union-attr]
        update={"name": "embedding"}
    )
    assert ModelSignature.model_validate_json(declared.model_dump_json()) == declared
    for shape in ([16], [-1, 0], [4, 16], [-1, 4, 4]):
        with pytest.raises(ValueError, match=r"must have shape \[-1, size\]"):
            ModelSignature.model_validate(_signature(embedding={"name": "f", "shape": shape}))
    with pytest.raises(ValueError, match="tensor of its own"):
        ModelSignature.model_validate(_signature(embedding={"name": "scores", "shape": [-1, 10]}))


def test_the_reference_declares_its_embedding_and_old_versions_have_none() -> None:
    assert reference_signature(10, embedding_size=64).embedding_size == 64
    assert signature_or_reference(None, 10).embedding is None


def test_versions_without_a_declaration_are_the_mnist_reference() -> None:
    signature = signature_or_reference(None, 7)

    assert signature.preprocessing == MNIST_PREPROCESS
    assert signature.num_classes == 7
    assert signature.input.shape == (-1, 1, 28, 28)
    assert reference_signature(3).architecture == "DigitNet"


# --- what the entry point leaves ----------------------------------------------------------------


def test_outputs_are_read_and_the_tensors_renamed_to_the_serving_names(tmp_path: Path) -> None:
    folder = _leave(
        tmp_path / "out",
        params_json={"optimizer": "SGD", "layers": 1},
        config_pbtxt='name: "x"\n',
    )

    outputs = read_outputs(folder, CLASSES)

    assert (outputs.signature.input.name, outputs.signature.output.name) == ("image", "logits")
    assert outputs.metrics == {"val_accuracy": [0.5, 0.7]}
    assert outputs.final_metrics() == {"val_accuracy": 0.7}
    assert outputs.params == {"optimizer": "SGD", "layers": "1"}
    assert outputs.config_pbtxt == 'name: "x"\n'
    assert outputs.state_dict is None
    smoke_test(
        outputs, [_write(tmp_path / f"{i}.png", png) for i, png in enumerate(_digit_pngs(3))]
    )


def test_a_declared_embedding_output_is_checked_and_renamed_to_embedding(tmp_path: Path) -> None:
    embedding = {"name": "features", "shape": [-1, 16]}
    folder = _leave(
        tmp_path / "out",
        onnx=_flat_with_features_onnx(),
        model_json=_signature(embedding=embedding),
    )

    outputs = read_outputs(folder, CLASSES)

    assert outputs.signature.embedding is not None
    assert (outputs.signature.embedding.name, outputs.signature.embedding_size) == (
        "embedding",
        16,
    )
    graph = onnx.load_from_string(outputs.onnx).graph
    assert [output.name for output in graph.output] == ["logits", "embedding"]
    smoke_test(outputs, [_write(tmp_path / "0.png", _digit_pngs(1)[0])])


@pytest.mark.parametrize(
    ("onnx_of", "embedding", "message"),
    [
        ("features", None, "has 2 outputs; model.json declares 1 \\('scores'\\)"),
        ("features", {"name": "hidden", "shape": [-1, 16]}, "has no output 'hidden'"),
        ("features", {"name": "features", "shape": [-1, 32]}, "has 16 at dimension 1"),
        ("flat", {"name": "features", "shape": [-1, 16]}, "has 1 outputs; model.json declares 2"),
    ],
)
def test_an_embedding_that_does_not_match_the_onnx_is_refused(
    tmp_path: Path, onnx_of: str, embedding: dict[str, object] | None, message: str
) -> None:
    onnx_bytes = _flat_with_features_onnx() if onnx_of == "features" else _flat_onnx()
    declared = _signature(embedding=embedding) if embedding else _signature()
    folder = _leave(tmp_path / "out", onnx=onnx_bytes, model_json=declared)

    with pytest.raises(EntryPointOutputError, match=message):
        read_outputs(folder, CLASSES)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"model_json": None}, "left no model.json"),
        ({"metrics_json": None}, "left no metrics.json"),
        ({"model_json": "{"}, "model.json is not a valid model declaration"),
        ({"model_json": _signature(outputs=[{"name": "scores", "shape": [-1, 3]}])}, "3 outputs"),
        ({"model_json": _signature(inputs=[{"name": "x", "shape": [-1, 3, 32, 32]}])}, "'x'"),
        ({"metrics_json": {"loss": "low"}}, "metrics.json: 'loss'"),
        ({"metrics_json": [1, 2]}, "must hold an object"),
        ({"params_json": {"nested": {"a": 1}}}, "params.json"),
        ({"config_pbtxt": "\x00binary"}, "config.pbtxt"),
    ],
)
def test_a_missing_or_invalid_output_is_refused_naming_the_file(
    tmp_path: Path, files: dict[str, object], message: str
) -> None:
    folder = _leave(tmp_path / "out", **files)

    with pytest.raises(EntryPointOutputError, match=message):
        read_outputs(folder, CLASSES)


def test_an_onnx_that_does_not_match_its_declaration_is_refused(tmp_path: Path) -> None:
    digits = export_onnx(DigitNet(10))
    folder = _leave(tmp_path / "out", onnx=digits)

    with pytest.raises(EntryPointOutputError, match="names its input 'image'"):
        read_outputs(folder, CLASSES)

    declared_like_digits = _signature(
        inputs=[{"name": "image", "shape": [-1, 3, 32, 32]}],
        outputs=[{"name": "logits", "shape": [-1, 10]}],
    )
    _leave(folder, onnx=digits, model_json=declared_like_digits)
    with pytest.raises(EntryPointOutputError, match="has 1 at dimension 1"):
        read_outputs(folder, CLASSES)

    (folder / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(EntryPointOutputError, match="does not load in onnxruntime"):
        read_outputs(folder, CLASSES)


# --- entry points -------------------------------------------------------------------------------


def test_entry_points_are_callables_or_script_paths(tmp_path: Path) -> None:
    assert EntryPoint.parse(DEFAULT_ENTRY_POINT).kind == "callable"
    assert EntryPoint.parse("train.py").kind == "script"
    assert EntryPoint.parse("train.py").resolved(tmp_path).target == str(tmp_path / "train.py")
    assert EntryPoint.parse("pkg.mod:fn").resolved(tmp_path).target == "pkg.mod:fn"
    with pytest.raises(EntryPointError):
        EntryPoint.parse("  ")
    with pytest.raises(EntryPointError, match="cannot be imported"):
        EntryPoint.parse("flywheel_vision.nowhere:train").load()
    with pytest.raises(EntryPointError, match="not a callable"):
        EntryPoint.parse("flywheel_vision.contract:CONTRACT_VERSION").load()


def _context(tmp_path: Path) -> TrainingContext:
    image = _write(tmp_path / "a.png", _digit_pngs(1)[0])
    sample = Sample(path=image, label=0, class_name="0", label_id=uuid.uuid4())
    return TrainingContext(
        project_id="digits",
        snapshot_id="snap-1",
        model_name="digits",
        work_dir=tmp_path,
        output_dir=tmp_path / "out",
        classes=["0"],
        train=[sample],
        validation=[],
        hyperparameters={"epochs": 1, "layers": [1, 2]},
        distributed=DistributedEnv.from_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "9"}),
    )


def test_a_script_gets_the_context_file_and_its_exit_status_is_reported(tmp_path: Path) -> None:
    context = _context(tmp_path)
    context_file = tmp_path / "context.json"
    context_file.write_text(context.model_dump_json())
    script = tmp_path / "train.py"
    script.write_text(
        "import json, sys\n"
        "context = json.load(open(sys.argv[sys.argv.index('--context') + 1]))\n"
        "open(context['work_dir'] + '/seen.json', 'w').write(json.dumps(context))\n"
        "sys.exit(context['hyperparameters']['epochs'] + 2)\n"
    )

    with pytest.raises(EntryPointError, match="exited with code 3") as raised:
        EntryPoint.parse(str(script)).run(context, context_file, python=sys.executable)

    assert raised.value.details["exit_code"] == 3
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["distributed"]["rank"] == 1
    assert seen["distributed"]["master_port"] == 9
    assert seen["hyperparameters"]["layers"] == [1, 2]
    assert seen["train"][0]["path"] == str(tmp_path / "a.png")
    with pytest.raises(EntryPointError, match="does not exist"):
        EntryPoint.parse(str(tmp_path / "gone.py")).run(context, context_file)
