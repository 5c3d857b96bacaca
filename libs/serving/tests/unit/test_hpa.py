import json
from pathlib import Path

import pytest

from flywheel_serving.hpa import hpa_values, main, requests_per_replica
from flywheel_serving.tuning import GoldenPoint, LoadPoint, ServingConfig

GOLDEN = GoldenPoint(
    config=ServingConfig(max_batch_size=16, max_queue_delay_microseconds=500, instance_count=2),
    point=LoadPoint(
        concurrency=16,
        requests=2000,
        errors=0,
        throughput_rps=412.77,
        p50_ms=20.0,
        p95_ms=31.0,
        p99_ms=38.5,
    ),
    hardware="Intel Xeon x 8 CPUs",
)


def test_the_target_is_the_golden_throughput_times_the_headroom_rounded_down() -> None:
    assert requests_per_replica(GOLDEN, 0.7) == 288.9
    assert requests_per_replica(GOLDEN, 1.0) == 412.7


def test_hpa_values_turn_on_the_requests_target_of_the_component() -> None:
    assert hpa_values(GOLDEN, 0.5) == {
        "triton": {"autoscaling": {"enabled": True, "requestsPerSecondPerReplica": 206.3}}
    }


@pytest.mark.parametrize("headroom", [0, -0.1, 1.5])
def test_a_headroom_outside_zero_to_one_is_refused(headroom: float) -> None:
    with pytest.raises(ValueError, match="headroom"):
        requests_per_replica(GOLDEN, headroom)


def test_a_golden_point_without_throughput_is_refused() -> None:
    idle = GOLDEN.model_copy(
        update={"point": GOLDEN.point.model_copy(update={"throughput_rps": 0})}
    )

    with pytest.raises(ValueError, match="no throughput"):
        requests_per_replica(idle)


def test_the_command_prints_a_values_snippet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    golden = tmp_path / "golden.json"
    golden.write_text(GOLDEN.model_dump_json())

    assert main([str(golden), "--headroom", "0.7"]) == 0

    comment, _, snippet = capsys.readouterr().out.partition("\n")
    assert comment == (
        "# 412.8 rps at concurrency 16 (p99 38.5 ms) on Intel Xeon x 8 CPUs, x 0.7 headroom"
    )
    assert json.loads(snippet) == hpa_values(GOLDEN, 0.7)
