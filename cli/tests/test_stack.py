from pathlib import Path

import pytest

from flywheel_cli.settings import CliSettings
from flywheel_cli.stack import (
    COMPONENTS,
    LOCAL_PROFILE,
    SERVICES_BY_NAME,
    Stack,
    StackError,
    plan_components,
    weed_command,
    weed_sockets,
)
from flywheel_cli.state import ComponentState, StackState
from flywheel_runtime.auth import generate_dev_key


def everything_installed(_: str) -> bool:
    return True


def test_the_default_plan_starts_everything_servers_first() -> None:
    plan = plan_components(is_installed=everything_installed)

    assert plan.components == COMPONENTS
    assert plan.components[:3] == ("s3", "mlflow", "triton")
    assert plan.skipped == {}


@pytest.mark.parametrize(
    ("selected", "expected"),
    [
        (["labeling"], ("s3", "labeling")),
        (["validator"], ("s3", "mlflow", "validator")),
        (["inference-bff"], ("s3", "mlflow", "triton", "inference-bff")),
        (["mlflow"], ("s3", "mlflow")),
    ],
)
def test_a_subset_brings_the_servers_it_needs(selected: list[str], expected: tuple[str]) -> None:
    assert plan_components(selected, is_installed=everything_installed).components == expected


def test_a_service_that_is_not_installed_is_skipped_unless_asked_for() -> None:
    def no_rollout(module: str) -> bool:
        return module != "flywheel_rollout"

    plan = plan_components(is_installed=no_rollout)
    assert "rollout" not in plan.components
    assert plan.skipped == {"rollout": "flywheel_rollout is not installed"}
    with pytest.raises(StackError, match="cannot start rollout"):
        plan_components(["rollout"], is_installed=no_rollout)


def test_an_unknown_component_is_refused_with_the_known_ones() -> None:
    with pytest.raises(StackError, match=r"unknown component.*labeling"):
        plan_components(["labelling"])


def running_servers(tmp_path: Path) -> StackState:
    def server(name: str, command: list[str], url: str) -> ComponentState:
        return ComponentState(name=name, pid=1, command=command, log=tmp_path / "x.log", url=url)

    state = StackState(namespace="t-")
    state = state.with_component(server("s3", ["weed"], "127.0.0.1:9333"))
    state = state.with_component(server("mlflow", ["mlflow"], "http://127.0.0.1:9500"))
    triton = ["python", "--http-port", "9800", "--grpc-port", "9801"]
    return state.with_component(server("triton", triton, "http://127.0.0.1:9800"))


def test_a_service_gets_the_stack_servers_its_port_namespace_and_the_dev_key(
    tmp_path: Path,
) -> None:
    key = generate_dev_key()
    stack = Stack(CliSettings(base_dir=tmp_path, namespace="t-", dev_signing_key=key))

    env = stack.service_env(SERVICES_BY_NAME["labeling"], 9081, running_servers(tmp_path))

    assert env["FLYWHEEL_S3_ENDPOINT"] == "127.0.0.1:9333"
    assert env["FLYWHEEL_MLFLOW_URI"] == "http://127.0.0.1:9500"
    assert env["FLYWHEEL_TRITON_URL"] == "127.0.0.1:9800"
    assert env["FLYWHEEL_LABELING_HTTP_PORT"] == "9081"
    assert env["FLYWHEEL_LABELING_NAMESPACE"] == "t-"
    assert env["FLYWHEEL_LABELING_AUTH__DEV_SIGNING_KEY"] == key


def test_services_that_serve_models_learn_where_triton_and_its_repository_are(
    tmp_path: Path,
) -> None:
    stack = Stack(CliSettings(base_dir=tmp_path, dev_signing_key=generate_dev_key()))
    state = running_servers(tmp_path)

    bff = stack.service_env(SERVICES_BY_NAME["inference-bff"], 9085, state)
    rollout = stack.service_env(SERVICES_BY_NAME["rollout"], 9086, state)

    assert bff["FLYWHEEL_BFF_TRITON_GRPC_URL"] == "127.0.0.1:9801"
    assert rollout["FLYWHEEL_ROLLOUT_REPOSITORY_DIR"] == str(tmp_path / "triton-repository")


def test_the_local_profile_applies_unless_the_environment_says_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLYWHEEL_DATA_MONITOR_TICK_INTERVAL_S", "7")
    stack = Stack(CliSettings(base_dir=tmp_path))
    state = running_servers(tmp_path)

    monitor = stack.service_env(SERVICES_BY_NAME["data-monitor"], 9082, state)
    validator = stack.service_env(SERVICES_BY_NAME["validator"], 9084, state)

    assert monitor["FLYWHEEL_DATA_MONITOR_TICK_INTERVAL_S"] == "7"
    gate = "FLYWHEEL_VALIDATOR_DEFAULT_GATES__MIN_ACCURACY"
    assert validator[gate] == LOCAL_PROFILE[gate]


def test_weed_runs_on_loopback_and_its_sockets_are_known_for_clean_up(tmp_path: Path) -> None:
    command = weed_command(Path("weed"), tmp_path, 9333)

    assert "-ip.bind=127.0.0.1" in command
    assert "-s3.port=9333" in command
    sockets = {path.name for path in weed_sockets(command)}
    assert "seaweedfs-s3-9333.sock" in sockets
    assert len(sockets) == 7


def test_workspaces_runs_on_8088_with_its_environments_under_the_base_directory(
    tmp_path: Path,
) -> None:
    key = generate_dev_key()
    stack = Stack(CliSettings(base_dir=tmp_path, dev_signing_key=key))

    env = stack.service_env(SERVICES_BY_NAME["workspaces"], 8088, running_servers(tmp_path))

    assert CliSettings().ports.workspaces == 8088
    assert env["FLYWHEEL_WORKSPACES_HTTP_PORT"] == "8088"
    assert env["FLYWHEEL_WORKSPACES_LOCAL_ROOT"] == str(tmp_path / "workspaces")
    assert env["FLYWHEEL_WORKSPACES_AUTH__DEV_SIGNING_KEY"] == key
    assert plan_components(["workspaces"], is_installed=everything_installed).components == (
        "workspaces",
    )
