from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from flywheel_vision.data import mnist_dataset
from flywheel_vision.export import (
    ParityError,
    check_parity,
    export_onnx,
    labels_json,
    read_labels,
    triton_config,
)
from flywheel_vision.model import EMBEDDING_SIZE, DigitNet
from flywheel_vision.preprocess import EMBEDDING_NAME, INPUT_NAME, OUTPUT_NAME


@pytest.fixture(scope="module")
def exported() -> tuple[DigitNet, bytes]:
    torch.manual_seed(0)
    model = DigitNet(10).eval()
    return model, export_onnx(model)


def test_export_has_named_tensors_and_a_dynamic_batch_dimension(
    exported: tuple[DigitNet, bytes],
) -> None:
    _, onnx_bytes = exported

    graph = onnx.load_from_string(onnx_bytes).graph

    assert [i.name for i in graph.input] == [INPUT_NAME]
    assert [o.name for o in graph.output] == [OUTPUT_NAME, EMBEDDING_NAME]
    input_dims = graph.input[0].type.tensor_type.shape.dim
    assert input_dims[0].dim_param  # symbolic: any batch size
    assert [d.dim_value for d in input_dims[1:]] == [1, 28, 28]
    logits, embedding = (output.type.tensor_type.shape.dim for output in graph.output)
    assert logits[0].dim_param
    assert logits[1].dim_value == 10
    assert embedding[0].dim_param
    assert embedding[1].dim_value == EMBEDDING_SIZE


def test_the_embedding_is_the_features_the_head_reads(exported: tuple[DigitNet, bytes]) -> None:
    model, onnx_bytes = exported
    images = mnist_dataset("test", 3).tensors[0]
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])

    (embedding,) = session.run([EMBEDDING_NAME], {INPUT_NAME: images.numpy()})

    with torch.inference_mode():
        expected = model.features(images).numpy()
    assert np.allclose(embedding, expected, atol=1e-5)


class _Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(28 * 28, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.layer(image.flatten(1))
        return logits


def test_a_model_is_exported_with_logits_only_when_asked_or_when_it_has_no_embedding() -> None:
    plain = _Linear()

    for onnx_bytes in (export_onnx(DigitNet(10), embedding=False), export_onnx(plain)):
        outputs = [output.name for output in onnx.load_from_string(onnx_bytes).graph.output]
        assert outputs == [OUTPUT_NAME]
    with pytest.raises(ValueError, match="forward_with_embedding"):
        export_onnx(plain, embedding=True)


@pytest.mark.parametrize("batch", [1, 7])
def test_onnxruntime_matches_pytorch_on_real_digits(
    exported: tuple[DigitNet, bytes], batch: int
) -> None:
    model, onnx_bytes = exported
    images = mnist_dataset("test", batch).tensors[0]

    difference = check_parity(model, onnx_bytes, images)

    assert difference < 1e-4


def test_parity_check_refuses_an_export_of_another_model(
    exported: tuple[DigitNet, bytes],
) -> None:
    _, onnx_bytes = exported
    torch.manual_seed(1)
    other = DigitNet(10)

    with pytest.raises(ParityError):
        check_parity(other, onnx_bytes, np.ones((2, 1, 28, 28), dtype=np.float32))


def test_labels_round_trip_in_index_order() -> None:
    assert read_labels(labels_json(["cat", "ant", "dog"])) == ["cat", "ant", "dog"]
    with pytest.raises(ValueError, match="classes"):
        read_labels(b'["no", "wrapper"]')


def _triton_model_config() -> Any:
    """Triton's ``inference.ModelConfig``, limited to the fields Flywheel writes.

    Names, types and numbers are those of Triton's model_config.proto, so a strict text-format
    parse rejects any field or enum value Triton would not know.
    """
    f = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="flywheel_test_model_config.proto", package="inference", syntax="proto3"
    )
    data_type = file.enum_type.add(name="DataType")
    types = ["INVALID", "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16"]
    types += ["INT32", "INT64", "FP16", "FP32", "FP64", "STRING", "BF16"]
    for number, name in enumerate(types):
        data_type.value.add(name=f"TYPE_{name}", number=number)

    def message(name: str, *fields: tuple[str, int, int, int, str]) -> Any:
        built = file.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            added = built.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                added.type_name = type_name
        return built

    one, many = f.LABEL_OPTIONAL, f.LABEL_REPEATED
    message(
        "ModelInput",
        ("name", 1, f.TYPE_STRING, one, ""),
        ("data_type", 2, f.TYPE_ENUM, one, ".inference.DataType"),
        ("dims", 4, f.TYPE_INT64, many, ""),
    )
    message(
        "ModelOutput",
        ("name", 1, f.TYPE_STRING, one, ""),
        ("data_type", 2, f.TYPE_ENUM, one, ".inference.DataType"),
        ("dims", 3, f.TYPE_INT64, many, ""),
    )
    group = message(
        "ModelInstanceGroup",
        ("name", 1, f.TYPE_STRING, one, ""),
        ("count", 2, f.TYPE_INT32, one, ""),
        ("kind", 4, f.TYPE_ENUM, one, ".inference.ModelInstanceGroup.Kind"),
    )
    kind = group.enum_type.add(name="Kind")
    for number, name in enumerate(["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"]):
        kind.value.add(name=name, number=number)
    message(
        "ModelDynamicBatching",
        ("preferred_batch_size", 1, f.TYPE_INT32, many, ""),
        ("max_queue_delay_microseconds", 2, f.TYPE_UINT64, one, ""),
    )
    policy = message(
        "ModelVersionPolicy",
        ("latest", 1, f.TYPE_MESSAGE, one, ".inference.ModelVersionPolicy.Latest"),
        ("specific", 3, f.TYPE_MESSAGE, one, ".inference.ModelVersionPolicy.Specific"),
    )
    latest = policy.nested_type.add(name="Latest")
    latest.field.add(name="num_versions", number=1, type=f.TYPE_UINT32, label=one)
    specific = policy.nested_type.add(name="Specific")
    specific.field.add(name="versions", number=1, type=f.TYPE_INT64, label=many)
    message("ModelParameter", ("string_value", 1, f.TYPE_STRING, one, ""))
    config = message(
        "ModelConfig",
        ("name", 1, f.TYPE_STRING, one, ""),
        ("platform", 2, f.TYPE_STRING, one, ""),
        ("version_policy", 3, f.TYPE_MESSAGE, one, ".inference.ModelVersionPolicy"),
        ("max_batch_size", 4, f.TYPE_INT32, one, ""),
        ("input", 5, f.TYPE_MESSAGE, many, ".inference.ModelInput"),
        ("output", 6, f.TYPE_MESSAGE, many, ".inference.ModelOutput"),
        ("instance_group", 7, f.TYPE_MESSAGE, many, ".inference.ModelInstanceGroup"),
        ("default_model_filename", 8, f.TYPE_STRING, one, ""),
        ("dynamic_batching", 11, f.TYPE_MESSAGE, one, ".inference.ModelDynamicBatching"),
        ("parameters", 14, f.TYPE_MESSAGE, many, ".inference.ModelConfig.ParametersEntry"),
        ("backend", 17, f.TYPE_STRING, one, ""),
    )
    entry = config.nested_type.add(name="ParametersEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=f.TYPE_STRING, label=one)
    entry.field.add(
        name="value",
        number=2,
        type=f.TYPE_MESSAGE,
        label=one,
        type_name=".inference.ModelParameter",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def _parse(text: str) -> Any:
    parsed = _triton_model_config()()
    text_format.Parse(text, parsed)
    return parsed


def test_onnx_config_is_valid_triton_text_with_names_shapes_and_batching() -> None:
    text = triton_config(
        "digits",
        num_classes=10,
        max_batch_size=64,
        preferred_batch_sizes=[16, 8, 16],
        max_queue_delay_microseconds=2000,
        instance_count=2,
        versions=[3, 1],
    )

    config = _parse(text)

    assert config.name == "digits"
    assert config.platform == "onnxruntime_onnx"
    assert config.default_model_filename == "model.onnx"
    assert config.max_batch_size == 64
    (model_input,) = config.input
    assert (model_input.name, list(model_input.dims)) == (INPUT_NAME, [1, 28, 28])
    assert model_input.data_type == 11  # TYPE_FP32
    (model_output,) = config.output
    assert (model_output.name, list(model_output.dims)) == (OUTPUT_NAME, [10])
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    (group,) = config.instance_group
    assert (group.count, group.kind) == (2, 2)  # KIND_CPU
    assert list(config.version_policy.specific.versions) == [1, 3]


def test_an_embedding_size_declares_the_embedding_output_after_the_logits() -> None:
    config = _parse(
        triton_config("digits", num_classes=10, max_batch_size=8, embedding_size=EMBEDDING_SIZE)
    )

    assert [(output.name, list(output.dims)) for output in config.output] == [
        (OUTPUT_NAME, [10]),
        (EMBEDDING_NAME, [EMBEDDING_SIZE]),
    ]
    assert all(output.data_type == 11 for output in config.output)  # TYPE_FP32


def test_python_backend_config_is_valid_triton_text_with_parameters() -> None:
    text = triton_config(
        "digits-py",
        num_classes=3,
        max_batch_size=8,
        platform="python",
        parameters={"onnx_file": "model.onnx", "EXECUTION_ENV_PATH": "$$TRITON_MODEL_DIRECTORY/e"},
    )

    config = _parse(text)

    assert config.backend == "python"
    assert config.platform == ""
    assert config.parameters["onnx_file"].string_value == "model.onnx"
    assert config.parameters["EXECUTION_ENV_PATH"].string_value == "$$TRITON_MODEL_DIRECTORY/e"
    assert list(config.output[0].dims) == [3]
    assert not config.HasField("version_policy")


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "two words"},
        {"max_batch_size": 0},
        {"preferred_batch_sizes": [128]},
        {"instance_kind": "KIND_TPU"},
        {"versions": []},
        {"parameters": {"key": 'quote " and \u00e9'}},
        {"embedding_size": 0},
    ],
)
def test_config_refuses_values_triton_would_reject(bad: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"name": "digits", "num_classes": 10, "max_batch_size": 64}

    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        triton_config(**(arguments | bad))
