import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from typer.testing import CliRunner

import flywheel_cli.app as cli
from flywheel_cli.settings import CliSettings
from flywheel_cli.state import StackState
from flywheel_cli.status import StatusReport
from flywheel_runtime.auth import generate_dev_key

runner = CliRunner()

Handler = Callable[[httpx.Request], httpx.Response]


def invoke(tmp_path: Path, *args: str) -> Any:
    return runner.invoke(cli.app, ["--base-dir", str(tmp_path), *args])


@pytest.fixture
def rollout(monkeypatch: pytest.MonkeyPatch) -> list[httpx.Request]:
    """Requests the commands send, answered by a fake rollout API."""
    monkeypatch.setenv("FLYWHEEL_CLI_DEV_SIGNING_KEY", generate_dev_key())
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        path = request.url.path
        if path.endswith("/timeline"):
            entry = {
                "kind": "canary.verdict",
                "actor": "rollout",
                "summary": "version 3 promoted to champion (50% → 100%)",
                "at": "2026-01-01T12:00:00Z",
            }
            return httpx.Response(200, json={"model_line": "digits", "entries": [entry]})
        if path.endswith("/promote") and request.url.host == "conflict":
            error = {"code": "conflict", "message": "no canary in progress", "details": {}}
            return httpx.Response(409, json={"error": error})
        canary = {
            "rollout_id": "00000000-0000-4000-8000-00000000f001",
            "model_line": "digits",
            "state": "promoting",
            "candidate_version": "3",
            "champion_version": "2",
            "traffic_percent": 50,
        }
        return httpx.Response(202, json=canary)

    def client(settings: CliSettings) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(answer))

    monkeypatch.setattr(cli, "http_client", client)
    return seen


def test_help_lists_every_command(tmp_path: Path) -> None:
    result = invoke(tmp_path, "--help")

    assert result.exit_code == 0
    for command in ("up", "down", "status", "promote", "rollback", "pause", "resume", "freeze"):
        assert command in result.output
    assert "timeline" in result.output
    assert "demo" in result.output


def test_promote_calls_rollout_as_an_operator_with_the_reason(
    tmp_path: Path, rollout: list[httpx.Request]
) -> None:
    result = invoke(tmp_path, "promote", "digits", "--reason", "looks good")

    assert result.exit_code == 0, result.output
    assert "promote digits: state=promoting" in result.output
    [request] = rollout
    assert request.method == "POST"
    assert request.url.path == "/api/v1/lines/digits/promote"
    assert request.url.port == 8086
    assert json.loads(request.content) == {"reason": "looks good"}
    token = request.headers["Authorization"].removeprefix("Bearer ")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["realm_access"]["roles"] == ["operator"]


@pytest.mark.parametrize("action", ["rollback", "pause", "resume", "freeze", "unfreeze"])
def test_every_operator_action_posts_to_its_route(
    tmp_path: Path, rollout: list[httpx.Request], action: str
) -> None:
    result = invoke(tmp_path, action, "digits")

    assert result.exit_code == 0, result.output
    assert rollout[0].url.path == f"/api/v1/lines/digits/{action}"
    assert json.loads(rollout[0].content) == {}


def test_actions_go_to_the_rollout_url_of_the_state_file(
    tmp_path: Path, rollout: list[httpx.Request]
) -> None:
    state = StackState(urls={"rollout": "http://conflict:9999"})
    (tmp_path / "state.json").write_text(state.model_dump_json())

    result = invoke(tmp_path, "promote", "digits")

    assert result.exit_code == 1
    assert "rollout answered 409 conflict: no canary in progress" in result.output
    assert rollout[0].url.port == 9999


def test_timeline_prints_the_line_entries(tmp_path: Path, rollout: list[httpx.Request]) -> None:
    result = invoke(tmp_path, "timeline", "digits")

    assert result.exit_code == 0, result.output
    assert "canary.verdict" in result.output
    assert "version 3 promoted to champion" in result.output
    assert rollout[0].url.path == "/api/v1/lines/digits/timeline"


def test_timeline_json_is_a_list_of_entries(tmp_path: Path, rollout: list[httpx.Request]) -> None:
    result = invoke(tmp_path, "timeline", "digits", "--json")

    [entry] = json.loads(result.stdout)
    assert entry["kind"] == "canary.verdict"


def test_status_json_prints_the_collected_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = StatusReport(namespace="t-", problems=["rollout: down"])
    seen: list[StackState | None] = []

    async def collect(settings: CliSettings, state: StackState | None) -> StatusReport:
        seen.append(state)
        return report

    monkeypatch.setattr(cli, "collect_status", collect)

    result = invoke(tmp_path, "status", "--json")

    assert result.exit_code == 0, result.output
    assert StatusReport.model_validate_json(result.stdout) == report
    assert seen == [None]


def test_status_renders_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def collect(settings: CliSettings, state: StackState | None) -> StatusReport:
        return StatusReport(problems=["mlflow: down"])

    monkeypatch.setattr(cli, "collect_status", collect)

    result = invoke(tmp_path, "status")

    assert result.exit_code == 0
    assert "Training runs" in result.output
    assert "mlflow: down" in result.output


def test_down_without_a_stack_is_a_no_op(tmp_path: Path) -> None:
    result = invoke(tmp_path, "down")

    assert result.exit_code == 0
    assert "nothing was running" in result.output


def test_up_refuses_an_unknown_service_before_touching_anything(tmp_path: Path) -> None:
    result = invoke(tmp_path, "up", "--services", "labeling,labelling")

    assert result.exit_code == 1
    assert "unknown component(s) ['labelling']" in result.output
    assert not (tmp_path / "state.json").exists()


def test_up_explains_how_to_start_rabbitmq_when_it_does_not_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLYWHEEL_RABBIT_URL", "amqp://guest:guest@127.0.0.1:1/")

    result = invoke(tmp_path, "up", "--services", "labeling")

    assert result.exit_code == 1
    assert "RabbitMQ does not answer at 127.0.0.1:1" in result.output
    assert "./scripts/ensure-servers" in result.output


def test_demo_refuses_an_unknown_scenario(tmp_path: Path) -> None:
    result = invoke(tmp_path, "demo", "--scenario", "chaos")

    assert result.exit_code == 2
    assert "normal, poisoned" in result.output


def test_operator_commands_need_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLYWHEEL_CLI_DEV_SIGNING_KEY", raising=False)
    monkeypatch.delenv("FLYWHEEL_CLI_TOKEN", raising=False)

    result = invoke(tmp_path, "pause", "digits")

    assert result.exit_code == 1
    assert "run `flywheel up`" in result.output
