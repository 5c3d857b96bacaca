"""`flywheel up`, `status --json` and `down` on the real servers, in a namespace of their own."""

import asyncio
import uuid
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from flywheel_cli.app import app
from flywheel_cli.infra import drop_database
from flywheel_cli.queues import from_amqp
from flywheel_cli.stack import plan_components
from flywheel_cli.state import StateFile
from flywheel_cli.status import StatusReport
from flywheel_cli.supervise import group_alive
from flywheel_contracts.topology import DEAD_LETTER_EXCHANGE, EVENTS_EXCHANGE, INFERENCE_EXCHANGE
from flywheel_testing.rabbit import delete_names

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]


def cleanup(rabbit_url: str, database_url: str, databases: list[str], namespace: str) -> None:
    report = asyncio.run(from_amqp(rabbit_url, namespace))
    queues = [q.name for q in report.queues] + [f"{q.name}.dlq" for q in report.queues]
    exchanges = [namespace + name for name in (EVENTS_EXCHANGE, INFERENCE_EXCHANGE)]
    asyncio.run(delete_names(rabbit_url, queues, [*exchanges, namespace + DEAD_LETTER_EXCHANGE]))
    for database in databases:
        drop_database(database_url, database)


def test_up_then_status_then_down_on_the_real_servers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rabbit_url: str, postgres_admin_url: str
) -> None:
    suffix = uuid.uuid4().hex[:8]
    database, mlflow_database = f"flywheel_cli_{suffix}", f"flywheel_cli_{suffix}_mlflow"
    database_url = (
        make_url(postgres_admin_url)
        .set(drivername="postgresql+asyncpg", database=database)
        .render_as_string(hide_password=False)
    )
    namespace = f"cli-{suffix}."
    monkeypatch.setenv("FLYWHEEL_RABBIT_URL", rabbit_url)
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", database_url)
    monkeypatch.setenv("FLYWHEEL_CLI_MLFLOW_DATABASE", mlflow_database)
    monkeypatch.setenv("FLYWHEEL_CLI_NAMESPACE", namespace)
    base = tmp_path / "stack"
    runner = CliRunner()
    state = None
    try:
        up = runner.invoke(app, ["--base-dir", str(base), "up", "--free-ports"])
        assert up.exit_code == 0, up.output
        state = StateFile(base / "state.json").load()
        assert state is not None
        assert tuple(state.components) == plan_components().components

        status = runner.invoke(app, ["--base-dir", str(base), "status", "--json"])

        assert status.exit_code == 0, status.output
        report = StatusReport.model_validate_json(status.stdout)
        assert report.problems == []
        assert report.namespace == namespace
        assert all(c.running for c in report.components)
        queues = {q.name: q for q in report.queues}
        assert queues[f"{namespace}data-monitor.labels.saved"].consumers == 1
        assert queues[f"{namespace}trainer-dispatch.threshold.reached"].dlq_messages == 0
        assert (base / "logs" / "labeling.log").stat().st_size > 0
    finally:
        down = runner.invoke(app, ["--base-dir", str(base), "down"])
        cleanup(rabbit_url, database_url, [database, mlflow_database], namespace)

    assert down.exit_code == 0, down.output
    assert not any(group_alive(c) for c in state.components.values())
    assert not (base / "state.json").exists()
    again = runner.invoke(app, ["--base-dir", str(base), "down"])
    assert "nothing was running" in again.output
