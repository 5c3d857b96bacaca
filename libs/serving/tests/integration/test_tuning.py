import uuid
from pathlib import Path

import pytest
from google.protobuf import text_format  # type: ignore[import-untyped]
from mlflow import MlflowClient
from tritonclient.grpc import model_config_pb2

from flywheel_clients.registry import ModelRegistry
from flywheel_serving.repository import CONFIG_FILE, ServingOptions, sync_from_registry
from flywheel_serving.triton import TritonControl, TritonServer
from flywheel_serving.tuning import (
    ARTIFACT_PATH,
    GOLDEN_TAG,
    PBTXT_FILE,
    PLOT_FILE,
    TAG_PREFIX,
    Constraints,
    GoldenPoint,
    ServingConfig,
    TuningGrid,
    best_point,
    log_golden,
    process_group_rss_mb,
    tune,
)
from flywheel_testing.serving import digit_model_files, register_model_files
from flywheel_vision.data import load_mnist, to_png

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

# The platform's default configuration, as the repository builder writes it without a golden one.
DEFAULT = ServingOptions(flavour="python")
GRID = TuningGrid(
    instance_counts=(1, 2),
    max_batch_sizes=(DEFAULT.max_batch_size,),
    max_queue_delays_us=(0, DEFAULT.max_queue_delay_microseconds),
    concurrencies=(1, 2),
    requests_per_level=500,
    rounds=5,
)
# p99 of a 100-request round is about its worst request; on a 2-core runner shared with other
# jobs the same configuration's p99 moved between 2.5 and 14 ms from run to run while the
# medians stayed put. "No worse" therefore allows half again plus 2 ms, far below the tens of
# milliseconds a configuration that trades latency for throughput adds.
P99_TOLERANCE = 1.5
P99_SLACK_MS = 2.0


def _knobs(pbtxt: str) -> tuple[int, int, int]:
    parsed = model_config_pb2.ModelConfig()
    text_format.Parse(pbtxt, parsed)
    return (
        parsed.max_batch_size,
        parsed.dynamic_batching.max_queue_delay_microseconds,
        parsed.instance_group[0].count,
    )


async def test_tuning_beats_the_default_and_the_repository_builder_serves_the_golden_config(
    triton_server: TritonServer, mlflow_tracking_uri: str, tmp_path: Path
) -> None:
    name = f"digits-{uuid.uuid4().hex[:8]}"
    files = digit_model_files(name, "1", seed=31)
    version = register_model_files(mlflow_tracking_uri, files)
    files = files.model_copy(update={"version": version})
    images, _ = load_mnist("test", limit=64)
    registry = ModelRegistry(mlflow_tracking_uri)

    result = await tune(
        triton_server.http_url,
        files,
        [to_png(image) for image in images],
        base=DEFAULT,
        grid=GRID,
        memory_probe=process_group_rss_mb(triton_server.pid),
    )

    # The default and the golden configuration, measured head to head in this run.
    golden = result.golden
    default = best_point(result.baseline.points, Constraints())
    assert golden is not None
    assert default is not None
    print(
        f"golden {golden.config.label}: {golden.point.throughput_rps:.0f} rps, p99 "
        f"{golden.point.p99_ms:.1f} ms at concurrency {golden.point.concurrency}, memory "
        f"{golden.memory_mb} MB; default: {default.throughput_rps:.0f} rps, p99 "
        f"{default.p99_ms:.1f} ms at concurrency {default.concurrency}; "
        f"{len(result.trials)} trials in {result.seconds} s on {result.hardware}"
    )
    for trial in result.trials:
        figures = ", ".join(
            f"c{p.concurrency} {p.throughput_rps:.0f} rps p99 {p.p99_ms:.1f} ms"
            for p in trial.points
        )
        print(f"  {trial.config.label} (memory {trial.memory_mb} MB): {figures}")
    assert golden.config != ServingConfig.of(DEFAULT)
    assert golden.point.throughput_rps > default.throughput_rps
    assert golden.point.p99_ms <= default.p99_ms * P99_TOLERANCE + P99_SLACK_MS
    assert golden.memory_mb is not None
    assert golden.memory_mb > 0
    async with TritonControl(triton_server.http_url) as control:
        leftovers = [
            entry.name
            for entry in await control.repository_index()
            if entry.name.startswith(f"{name}.tune-") and entry.state == "READY"
        ]
    assert leftovers == []

    uri = await log_golden(registry, result)

    info = await registry.get_version(name, version)
    assert GoldenPoint.model_validate_json(info.tags[GOLDEN_TAG]) == golden
    assert info.tags[f"{TAG_PREFIX}artifacts"] == uri
    client = MlflowClient(tracking_uri=mlflow_tracking_uri, registry_uri=mlflow_tracking_uri)
    downloaded = Path(
        client.download_artifacts(info.run_id or "", ARTIFACT_PATH, str(tmp_path / "logged"))
    )
    assert (downloaded / PLOT_FILE).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    logged_pbtxt = (downloaded / PBTXT_FILE).read_text()
    assert info.tags[f"{TAG_PREFIX}config_pbtxt"] == logged_pbtxt

    root = tmp_path / "repository"
    await sync_from_registry(registry, name, root, DEFAULT, versions=[version])

    written = (root / name / CONFIG_FILE).read_text()
    assert written == logged_pbtxt
    assert _knobs(written) == (
        golden.config.max_batch_size,
        golden.config.max_queue_delay_microseconds,
        golden.config.instance_count,
    )
