from datetime import UTC, datetime

import pytest
from google.protobuf import text_format  # type: ignore[import-untyped]
from tritonclient.grpc import model_config_pb2

from flywheel_clients.registry import ModelVersionInfo
from flywheel_serving.repository import ServingOptions, render_config
from flywheel_serving.tuning import (
    GOLDEN_TAG,
    Constraints,
    GoldenPoint,
    LoadPoint,
    ServingConfig,
    Trial,
    TuningGrid,
    TuningResult,
    beats,
    best_point,
    config_json,
    golden_config,
    golden_options,
    keep_raising,
    plot_png,
    search,
)

PYTHON = ServingOptions(flavour="python")
DEFAULT = ServingConfig.of(PYTHON)


def _point(concurrency: int, rps: float, p99: float, errors: int = 0) -> LoadPoint:
    return LoadPoint(
        concurrency=concurrency,
        requests=300,
        errors=errors,
        throughput_rps=rps,
        p50_ms=p99 / 3,
        p95_ms=p99 / 2,
        p99_ms=p99,
    )


def _trial(config: ServingConfig, *points: LoadPoint, memory: float | None = None) -> Trial:
    return Trial(config=config, points=list(points), memory_mb=memory)


def test_apply_changes_the_knobs_keeps_the_rest_and_clips_preferred_sizes() -> None:
    base = ServingOptions(flavour="python", intra_op_threads=2, preferred_batch_sizes=(4, 8, 16))

    options = ServingConfig(
        max_batch_size=8, max_queue_delay_microseconds=0, instance_count=3
    ).apply(base)

    assert options.max_batch_size == 8
    assert options.max_queue_delay_microseconds == 0
    assert options.instance_count == 3
    assert options.preferred_batch_sizes == (4, 8)
    assert options.flavour == "python"
    assert options.intra_op_threads == 2
    assert ServingConfig.of(options) == ServingConfig(
        max_batch_size=8, max_queue_delay_microseconds=0, instance_count=3
    )


def test_best_point_keeps_to_the_limits_and_skips_levels_with_errors() -> None:
    points = [_point(1, 500, 2), _point(4, 1500, 6), _point(16, 2500, 30), _point(64, 2600, 9, 1)]

    assert best_point(points, Constraints()) == points[2]
    assert best_point(points, Constraints(max_p99_ms=10)) == points[1]
    assert best_point(points, Constraints(max_p99_ms=1)) is None
    assert best_point(points, Constraints(max_p99_ms=10, min_throughput_rps=2000)) is None


def test_best_point_breaks_a_throughput_tie_by_the_lower_p99() -> None:
    points = [_point(4, 1000, 8), _point(8, 1000, 5)]

    assert best_point(points, Constraints()) == points[1]


def test_keep_raising_stops_when_throughput_saturates_p99_breaks_the_limit_or_errors_appear() -> (
    None
):
    limit = Constraints(max_p99_ms=20)

    assert keep_raising([], limit, 0.05)
    assert keep_raising([_point(1, 500, 2), _point(4, 1500, 6)], limit, 0.05)
    assert not keep_raising([_point(1, 500, 2), _point(4, 510, 6)], limit, 0.05)
    assert not keep_raising([_point(1, 500, 2), _point(4, 1500, 25)], limit, 0.05)
    assert not keep_raising([_point(1, 500, 2, errors=3)], limit, 0.05)
    assert keep_raising([_point(1, 500, 2), _point(4, 1500, 25)], Constraints(), 0.05)


def test_beats_needs_the_minimum_gain_within_the_constraints() -> None:
    incumbent = _trial(DEFAULT, _point(4, 1000, 5))
    faster = DEFAULT.model_copy(update={"instance_count": 2})

    assert beats(_trial(faster, _point(4, 1100, 5)), incumbent, Constraints(), min_gain=0.05)
    assert not beats(_trial(faster, _point(4, 1040, 5)), incumbent, Constraints(), min_gain=0.05)
    # Faster only past the latency limit: no.
    assert not beats(
        _trial(faster, _point(4, 1020, 5), _point(16, 3000, 50)),
        _trial(DEFAULT, _point(4, 1000, 5)),
        Constraints(max_p99_ms=10),
        min_gain=0.05,
    )


def test_beats_refuses_a_candidate_over_the_memory_limit_or_that_failed_to_load() -> None:
    incumbent = _trial(DEFAULT, _point(4, 1000, 5), memory=100)
    bigger = DEFAULT.model_copy(update={"instance_count": 4})
    limit = Constraints(max_memory_mb=300)

    assert beats(_trial(bigger, _point(4, 2000, 5), memory=250), incumbent, limit, min_gain=0)
    assert not beats(_trial(bigger, _point(4, 2000, 5), memory=400), incumbent, limit, min_gain=0)
    assert not beats(_trial(bigger, _point(4, 2000, 5)), incumbent, limit, min_gain=0)
    refused = Trial(config=bigger, error="too many instances")
    assert not beats(refused, incumbent, Constraints(), min_gain=0)


def test_beats_takes_any_qualifying_candidate_over_an_incumbent_that_qualifies_nowhere() -> None:
    incumbent = _trial(DEFAULT, _point(4, 3000, 50))
    challenger = _trial(DEFAULT.model_copy(update={"max_queue_delay_microseconds": 0}))
    challenger = challenger.model_copy(update={"points": [_point(4, 1000, 5)]})

    assert beats(challenger, incumbent, Constraints(max_p99_ms=10), min_gain=0.05)


def _synthetic(throughput: dict[tuple[int, int, int], float]):  # type: ignore[no-untyped-def]
    tried: list[ServingConfig] = []

    def figure(config: ServingConfig) -> float:
        key = (config.instance_count, config.max_batch_size, config.max_queue_delay_microseconds)
        return throughput.get(key, 100.0)

    async def compare(incumbent: ServingConfig, challenger: ServingConfig) -> tuple[Trial, Trial]:
        tried.append(challenger)
        return (
            _trial(incumbent, _point(4, figure(incumbent), 5)),
            _trial(challenger, _point(4, figure(challenger), 5)),
        )

    return compare, tried


async def test_search_moves_one_knob_at_a_time_and_skips_the_rest_of_a_direction_that_stops_helping() -> (  # noqa: E501
    None
):
    grid = TuningGrid(
        instance_counts=(1, 2, 4, 8),
        max_batch_sizes=(8, 64, 128),
        max_queue_delays_us=(0, 500, 2000),
    )
    compare, tried = _synthetic(
        {
            (1, 64, 500): 1000,
            (1, 64, 2000): 900,  # no gain upwards; downwards 0 wins
            (1, 64, 0): 1200,
            (1, 128, 0): 1200,  # no gain upwards, so downwards: 8 is worse
            (1, 8, 0): 900,
            (2, 64, 0): 1500,
            (4, 64, 0): 1400,  # worse than 2: 8 is never tried
            (8, 64, 0): 9999,
        }
    )

    best, trials = await search(DEFAULT, grid, Constraints(), compare)

    assert best == DEFAULT.model_copy(
        update={"instance_count": 2, "max_queue_delay_microseconds": 0}
    )
    knobs = [(c.instance_count, c.max_batch_size, c.max_queue_delay_microseconds) for c in tried]
    assert knobs == [
        (1, 64, 2000),
        (1, 64, 0),
        (1, 128, 0),
        (1, 8, 0),
        (2, 64, 0),
        (4, 64, 0),
    ]
    assert len(trials) == 2 * len(tried)


async def test_search_keeps_the_baseline_when_nothing_beats_it_by_the_minimum_gain() -> None:
    grid = TuningGrid(instance_counts=(1, 2), max_batch_sizes=(64,), max_queue_delays_us=(0, 500))
    compare, tried = _synthetic({(1, 64, 500): 1000, (2, 64, 500): 1030, (1, 64, 0): 1040})

    best, _ = await search(DEFAULT, grid, Constraints(), compare)

    assert best == DEFAULT
    assert len(tried) == 2


def test_golden_options_take_the_newest_served_version_that_has_a_golden_config() -> None:
    old = ServingConfig(max_batch_size=8, max_queue_delay_microseconds=0, instance_count=2)
    new = ServingConfig(max_batch_size=32, max_queue_delay_microseconds=100, instance_count=3)
    golden_new = GoldenPoint(config=new, point=_point(4, 1000, 5), hardware="cpu")
    versions = [
        ModelVersionInfo(name="m", version="10", tags={GOLDEN_TAG: golden_new.model_dump_json()}),
        ModelVersionInfo(name="m", version="9", tags={GOLDEN_TAG: old.model_dump_json()}),
        ModelVersionInfo(name="m", version="11"),
    ]

    assert ServingConfig.of(golden_options(versions, PYTHON)) == new
    assert ServingConfig.of(golden_options(versions[1:], PYTHON)) == old
    assert golden_options(versions[2:], PYTHON) == PYTHON


def test_a_malformed_golden_tag_is_ignored() -> None:
    assert golden_config({GOLDEN_TAG: '{"max_batch_size": 0}'}) is None
    assert golden_config({GOLDEN_TAG: "not json"}) is None
    assert golden_config({}) is None


def test_project_constraints_are_overridden_only_by_the_limits_set() -> None:
    project = Constraints(max_p99_ms=50, min_throughput_rps=100)

    merged = project.merged(Constraints(max_p99_ms=20, max_memory_mb=512))

    assert merged == Constraints(max_p99_ms=20, min_throughput_rps=100, max_memory_mb=512)
    assert project.merged(Constraints()) == project


def test_config_json_carries_the_knobs_of_the_pbtxt() -> None:
    options = DEFAULT.model_copy(update={"instance_count": 3}).apply(PYTHON)
    pbtxt = render_config("m", 10, [1], options)

    parsed = model_config_pb2.ModelConfig()
    text_format.Parse(pbtxt, parsed)
    as_json = config_json(pbtxt)

    assert parsed.instance_group[0].count == 3
    assert '"count": 3' in as_json
    assert '"maxQueueDelayMicroseconds": "500"' in as_json


def test_plot_is_a_png() -> None:
    faster = DEFAULT.model_copy(update={"instance_count": 2})
    baseline = _trial(DEFAULT, _point(1, 500, 2), _point(4, 1000, 6))
    result = TuningResult(
        model_name="m",
        version="1",
        num_classes=10,
        hardware="test CPU",
        constraints=Constraints(max_p99_ms=10),
        grid=TuningGrid(),
        base=PYTHON,
        trials=[baseline, _trial(faster, _point(1, 520, 2), _point(4, 1500, 5))],
        golden=GoldenPoint(config=faster, point=_point(4, 1500, 5), hardware="test CPU"),
        baseline=baseline,
        started_at=datetime.now(UTC),
        seconds=1.0,
    )

    png = plot_png(result)

    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert result.changed


@pytest.mark.parametrize("count", [0, -1])
def test_serving_config_refuses_impossible_knobs(count: int) -> None:
    with pytest.raises(ValueError, match="instance_count"):
        ServingConfig(max_batch_size=8, max_queue_delay_microseconds=0, instance_count=count)
