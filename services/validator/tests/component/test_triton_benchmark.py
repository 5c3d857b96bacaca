from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from flywheel_serving.errors import ModelLoadError, TritonError
from flywheel_serving.repository import ServingOptions
from flywheel_serving.tuning import LoadPoint, ServingConfig
from flywheel_testing.serving import digit_model_files
from flywheel_validator.adapters.triton import TritonBenchmark, triton_name
from flywheel_validator.errors import ServingRefusedError
from flywheel_validator.ports import ServedModel
from flywheel_vision.contract import ModelSignature, TensorSpec, reference_signature
from flywheel_vision.preprocess import MNIST_PREPROCESS, PreprocessSpec

OPTIONS = ServingOptions(flavour="python", max_batch_size=8, preferred_batch_sizes=(8,))


@dataclass
class FakeControl:
    url: str = "triton:8000"
    refuse: set[str] = field(default_factory=set)
    calls: list[tuple[str, str]] = field(default_factory=list)

    async def load(self, model: str, **_: Any) -> None:
        self.calls.append(("load", model))
        if model in self.refuse:
            raise ModelLoadError("bad model")

    async def wait_model_ready(self, model: str, *_: Any, **__: Any) -> None:
        self.calls.append(("ready", model))

    async def unload(self, model: str) -> None:
        self.calls.append(("unload", model))

    async def server_ready(self) -> bool:
        return True


@dataclass
class FakeMeasure:
    """Records which model was driven at which level; ``failing`` models answer nothing."""

    failing: set[str] = field(default_factory=set)
    calls: list[tuple[str, int]] = field(default_factory=list)
    specs: dict[str, PreprocessSpec] = field(default_factory=dict)

    async def __call__(
        self,
        url: str,
        model: str,
        _version: str,
        images: Sequence[bytes],
        levels: Sequence[int],
        *,
        requests_per_level: int,
        rounds: int,
        spec: PreprocessSpec,
    ) -> list[LoadPoint]:
        assert (url, rounds, images) == ("triton:8000", 1, [b"png"])
        (level,) = levels
        self.calls.append((model.split(".")[1], level))
        self.specs[model.split(".")[1]] = spec
        if model in self.failing:
            raise TritonError("every request of a load level failed")
        return [
            LoadPoint(
                concurrency=level,
                requests=requests_per_level,
                errors=0,
                throughput_rps=100.0 * level,
                p50_ms=1,
                p95_ms=2,
                p99_ms=3,
            )
        ]


def leftovers(repository: Path) -> list[Path]:
    return list(repository.iterdir())


def served(role: str, version: str, config: ServingConfig | None = None) -> ServedModel:
    return ServedModel(role, digit_model_files("digits", version, seed=int(version)), config)


def read_config(model_dir: Path) -> str:
    return (model_dir / "config.pbtxt").read_text()


def bench(control: FakeControl, measure: FakeMeasure, repository: Path) -> TritonBenchmark:
    return TritonBenchmark(
        control,  # type: ignore[arg-type]
        repository,
        OPTIONS,
        concurrencies=[1, 4],
        requests_per_level=20,
        rounds=2,
        measure_fn=measure,
    )


async def test_both_models_take_turns_at_every_level_and_are_retired(tmp_path: Path) -> None:
    control, measure = FakeControl(), FakeMeasure()
    golden = ServingConfig(max_batch_size=4, max_queue_delay_microseconds=0, instance_count=2)

    run = await bench(control, measure, tmp_path).compare(
        served("candidate", "2"), served("champion", "1", golden), [b"png"]
    )

    assert measure.calls == [
        ("candidate", 1),
        ("champion", 1),
        ("champion", 4),
        ("candidate", 4),
        ("champion", 1),
        ("candidate", 1),
        ("candidate", 4),
        ("champion", 4),
    ]
    assert [p.concurrency for p in run.candidate] == [1, 4, 1, 4]
    assert "CPUs" in run.hardware
    assert "champion golden (batch 4, queue delay 0 us, 2 instances)" in run.description
    candidate, champion = (
        triton_name("candidate", "digits", "2"),
        triton_name("champion", "digits", "1"),
    )
    assert control.calls[:4] == [
        ("load", candidate),
        ("ready", candidate),
        ("load", champion),
        ("ready", champion),
    ]
    assert control.calls[-2:] == [("unload", candidate), ("unload", champion)]
    assert leftovers(tmp_path) == []


async def test_the_champions_golden_config_is_what_triton_reads(tmp_path: Path) -> None:
    control = FakeControl()
    golden = ServingConfig(max_batch_size=4, max_queue_delay_microseconds=0, instance_count=2)
    seen: dict[str, str] = {}

    async def capture(url: str, model: str, *args: Any, **kwargs: Any) -> list[LoadPoint]:
        seen[model] = read_config(tmp_path / model)
        return await FakeMeasure()(url, model, *args, **kwargs)

    await TritonBenchmark(
        control,  # type: ignore[arg-type]
        tmp_path,
        OPTIONS,
        concurrencies=[1],
        requests_per_level=5,
        rounds=1,
        measure_fn=capture,
    ).compare(served("candidate", "2"), served("champion", "1", golden), [b"png"])

    champion = seen[triton_name("champion", "digits", "1")]
    candidate = seen[triton_name("candidate", "digits", "2")]
    assert "max_batch_size: 4" in champion
    assert "count: 2" in champion
    assert "max_batch_size: 8" in candidate


async def test_a_model_that_answers_nothing_gets_a_level_of_errors(tmp_path: Path) -> None:
    measure = FakeMeasure(failing={triton_name("candidate", "digits", "2")})

    run = await bench(FakeControl(), measure, tmp_path).compare(
        served("candidate", "2"), served("champion", "1"), [b"png"]
    )

    assert [(p.errors, p.throughput_rps) for p in run.candidate] == [(20, 0.0)] * 4
    assert [p.errors for p in run.champion] == [0] * 4


@pytest.mark.parametrize("role", ["candidate", "champion"])
async def test_a_model_triton_refuses_says_which_and_nothing_is_left(
    tmp_path: Path, role: str
) -> None:
    version = "2" if role == "candidate" else "1"
    control = FakeControl(refuse={triton_name(role, "digits", version)})

    with pytest.raises(ServingRefusedError) as refused:
        await bench(control, FakeMeasure(), tmp_path).compare(
            served("candidate", "2"), served("champion", "1"), [b"png"]
        )

    assert refused.value.details == {"role": role, "version": version}
    assert [c for c in control.calls if c[0] == "unload"]
    assert leftovers(tmp_path) == []


def test_long_names_are_cut_to_what_triton_takes() -> None:
    name = triton_name("candidate", "m" * 200, "12")

    assert len(name) == 128
    assert name.startswith("validator.candidate.mmm")
    assert name != triton_name("candidate", "m" * 201, "12")


async def test_each_model_is_driven_with_the_preprocessing_it_declares(tmp_path: Path) -> None:
    rgb = PreprocessSpec(height=32, width=32, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    reference = reference_signature(10, architecture="TinyConvNet")
    signature = ModelSignature(
        architecture="TinyConvNet",
        inputs=(TensorSpec(name="image", shape=(-1, 3, 32, 32)),),
        outputs=reference.outputs,
        preprocessing=rgb,
    )
    declared = ServedModel(
        "candidate",
        digit_model_files("digits", "2", seed=2).model_copy(
            update={"model_json": signature.model_dump_json().encode()}
        ),
    )
    measure = FakeMeasure()

    await bench(FakeControl(), measure, tmp_path).compare(
        declared, served("champion", "1"), [b"png"]
    )

    assert measure.specs == {"candidate": rgb, "champion": MNIST_PREPROCESS}
