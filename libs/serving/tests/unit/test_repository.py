import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from flywheel_clients.registry import ModelFiles
from flywheel_runtime.errors import InvalidInputError
from flywheel_serving.repository import (
    ServingOptions,
    build_model_repository,
    python_backend_source,
    triton_s3_uri,
)
from flywheel_vision.contract import ModelSignature, TensorSpec
from flywheel_vision.preprocess import PreprocessSpec

PYTHON = ServingOptions(flavour="python", intra_op_threads=2)
ORT = ServingOptions()
DIGITS = [str(d) for d in range(10)]


def _files(version: str, name: str = "digits", labels: list[str] | None = None) -> ModelFiles:
    return ModelFiles(
        name=name, version=version, onnx=f"onnx-{version}".encode(), labels=labels or DIGITS
    )


def _tree(root: Path) -> set[str]:
    return {path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()}


def test_python_flavour_writes_each_version_with_model_py_and_lists_exactly_those_versions(
    tmp_path: Path,
) -> None:
    model_dir = build_model_repository(tmp_path, "digits", [_files("3"), _files("1")], PYTHON)

    config = (model_dir / "config.pbtxt").read_text()
    assert model_dir == tmp_path / "digits"
    assert _tree(tmp_path) == {
        "digits/config.pbtxt",
        "digits/1/model.onnx",
        "digits/1/labels.json",
        "digits/1/model.py",
        "digits/3/model.onnx",
        "digits/3/labels.json",
        "digits/3/model.py",
    }
    assert (model_dir / "3" / "model.onnx").read_bytes() == b"onnx-3"
    assert json.loads((model_dir / "1" / "labels.json").read_bytes()) == {"classes": DIGITS}
    assert (model_dir / "1" / "model.py").read_bytes() == python_backend_source()
    assert b"class TritonPythonModel" in python_backend_source()
    assert 'name: "digits"' in config
    assert 'backend: "python"' in config
    assert "platform" not in config
    assert "specific { versions: [ 1, 3 ] }" in config
    assert "dims: [ 10 ]" in config
    assert "max_batch_size: 64" in config
    assert "preferred_batch_size: [ 8, 16, 32 ]" in config
    assert "max_queue_delay_microseconds: 500" in config
    assert 'key: "intra_op_threads"\n  value { string_value: "2" }' in config


def test_onnxruntime_flavour_declares_the_platform_and_ships_no_model_py(tmp_path: Path) -> None:
    options = ServingOptions(
        max_batch_size=16, preferred_batch_sizes=(4,), instance_count=2, instance_kind="KIND_GPU"
    )

    model_dir = build_model_repository(tmp_path, "digits", [_files("2")], options)

    config = (model_dir / "config.pbtxt").read_text()
    assert _tree(model_dir) == {"config.pbtxt", "2/model.onnx", "2/labels.json"}
    assert 'platform: "onnxruntime_onnx"' in config
    assert 'default_model_filename: "model.onnx"' in config
    assert "backend" not in config
    assert "specific { versions: [ 2 ] }" in config
    assert "count: 2\n    kind: KIND_GPU" in config
    assert "intra_op_threads" not in config


def test_rebuilding_removes_retired_versions_and_files_of_another_flavour(tmp_path: Path) -> None:
    build_model_repository(tmp_path, "digits", [_files("1"), _files("2")], PYTHON)
    (tmp_path / "digits" / "notes").mkdir()

    build_model_repository(tmp_path, "digits", [_files("2"), _files("3")], ORT)

    assert _tree(tmp_path / "digits") == {
        "config.pbtxt",
        "2/model.onnx",
        "2/labels.json",
        "3/model.onnx",
        "3/labels.json",
    }
    assert (tmp_path / "digits" / "notes").is_dir()  # not a version folder: left alone
    assert "specific { versions: [ 2, 3 ] }" in (tmp_path / "digits" / "config.pbtxt").read_text()


def test_unchanged_files_are_not_rewritten_and_no_temporary_files_remain(tmp_path: Path) -> None:
    model_dir = build_model_repository(tmp_path, "digits", [_files("1")], PYTHON)
    before = {path: path.stat().st_mtime_ns for path in model_dir.rglob("*") if path.is_file()}

    build_model_repository(tmp_path, "digits", [_files("1"), _files("2")], PYTHON)

    unchanged = {path for path in before if path.parent.name == "1"}
    assert len(unchanged) == 3
    assert all(path.stat().st_mtime_ns == before[path] for path in unchanged)
    assert "versions: [ 1, 2 ]" in (model_dir / "config.pbtxt").read_text()
    assert not list(model_dir.rglob(".*"))


@pytest.mark.parametrize(
    "name", ["", "../escape", "a/b", "with space", "-leading-dash", "é", "x" * 129]
)
def test_names_triton_cannot_serve_are_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidInputError, match="model name"):
        build_model_repository(tmp_path, name, [_files("1", name=name)], PYTHON)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("versions", "message"),
    [
        ([], "at least one version"),
        ([_files("1"), _files("1")], "listed twice"),
        ([_files("v2")], "positive integer"),
        ([_files("0")], "positive integer"),
        ([_files("1", name="other")], "another model"),
        ([_files("1"), _files("2", labels=["a", "b"])], "same number of classes"),
    ],
)
def test_version_sets_that_cannot_share_one_config_are_rejected(
    tmp_path: Path, versions: list[ModelFiles], message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        build_model_repository(tmp_path, "digits", versions, PYTHON)


def test_options_are_frozen_and_checked() -> None:
    with pytest.raises(ValidationError, match="preferred batch sizes"):
        ServingOptions(max_batch_size=8, preferred_batch_sizes=(16,))
    with pytest.raises(ValidationError):
        ServingOptions(instance_kind="KIND_TPU")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        PYTHON.max_batch_size = 2  # type: ignore[misc]


def test_s3_uris_are_spelled_the_way_triton_reads_them() -> None:
    assert triton_s3_uri("models", "/serving/", endpoint="minio:9000") == (
        "s3://minio:9000/models/serving"
    )
    assert triton_s3_uri("models", "serving", endpoint="s3.example:443", secure=True) == (
        "s3://https://s3.example:443/models/serving"
    )
    assert triton_s3_uri("models", "", endpoint="s3.amazonaws.com") == "s3://models"


def _declared(
    version: str, height: int, channels: int, *, embedding: int | None = None
) -> ModelFiles:
    signature = ModelSignature(
        inputs=(TensorSpec(name="image", shape=(-1, channels, height, height)),),
        outputs=(TensorSpec(name="logits", shape=(-1, 10)),),
        preprocessing=PreprocessSpec(
            height=height,
            width=height,
            channels=channels,
            mean=(0.5,) * channels,
            std=(0.5,) * channels,
        ),
        embedding=None
        if embedding is None
        else TensorSpec(name="embedding", shape=(-1, embedding)),
    )
    return _files(version).model_copy(update={"model_json": signature.model_dump_json().encode()})


def test_the_input_shape_is_the_declared_one_and_variable_where_versions_differ(
    tmp_path: Path,
) -> None:
    same = build_model_repository(tmp_path / "a", "digits", [_declared("2", 32, 3)], PYTHON)
    mixed = build_model_repository(
        tmp_path / "b", "digits", [_files("1"), _declared("2", 32, 3)], PYTHON
    )
    reference = build_model_repository(tmp_path / "c", "digits", [_files("1")], PYTHON)

    assert "dims: [ 3, 32, 32 ]" in (same / "config.pbtxt").read_text()
    assert "dims: [ -1, -1, -1 ]" in (mixed / "config.pbtxt").read_text()
    assert "dims: [ 1, 28, 28 ]" in (reference / "config.pbtxt").read_text()
    assert "model.json" not in {p.name for p in (mixed / "2").iterdir()}
    broken = _files("3").model_copy(update={"model_json": b"{}"})
    with pytest.raises(InvalidInputError, match="version 3 has an invalid model"):
        build_model_repository(tmp_path / "d", "digits", [broken], PYTHON)


def test_the_embedding_output_is_declared_only_when_every_version_has_one_of_one_size(
    tmp_path: Path,
) -> None:
    def config(*versions: ModelFiles) -> str:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        return (
            build_model_repository(folder, "digits", versions, PYTHON) / "config.pbtxt"
        ).read_text()

    both = config(_declared("1", 28, 1, embedding=64), _declared("2", 32, 3, embedding=64))
    one_without = config(_files("1"), _declared("2", 28, 1, embedding=64))
    sizes_differ = config(_declared("1", 28, 1, embedding=64), _declared("2", 28, 1, embedding=32))

    assert 'dims: [ 10 ]\n  },\n  {\n    name: "embedding"' in both
    assert "dims: [ 64 ]" in both
    assert "embedding" not in one_without
    assert "embedding" not in sizes_differ
