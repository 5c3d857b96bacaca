"""``flywheel status``: one report of the stack, gathered concurrently, shown as tables or JSON.

Each part (processes, queues, training runs, canaries, registry) is read on its own; a part
whose source does not answer becomes a line under ``problems`` instead of failing the report,
since ``status`` is what an operator runs when something is wrong.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from flywheel_cli.endpoints import stack_urls
from flywheel_cli.queues import QueueDepth, queue_report
from flywheel_cli.registry import LineView, MlflowRegistry
from flywheel_cli.services import CanaryView, RunView, Services
from flywheel_cli.settings import CliSettings
from flywheel_cli.stack import COMPONENTS
from flywheel_cli.state import StackState
from flywheel_cli.supervise import is_running

T = TypeVar("T")


class ComponentView(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    running: bool
    pid: int | None = None
    url: str | None = None
    log: str | None = None


class StatusReport(BaseModel):
    """Everything ``status`` shows; ``--json`` prints it as it is."""

    model_config = ConfigDict(frozen=True)

    generated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    namespace: str = ""
    components: list[ComponentView] = Field(default_factory=list)
    queue_source: str | None = None
    queues: list[QueueDepth] = Field(default_factory=list)
    runs: list[RunView] = Field(default_factory=list)
    canaries: list[CanaryView] = Field(default_factory=list)
    lines: list[LineView] = Field(default_factory=list)
    problems: list[str] = Field(default_factory=list)


def component_views(state: StackState | None) -> list[ComponentView]:
    if state is None:
        return []
    return [
        ComponentView(name=c.name, running=is_running(c), pid=c.pid, url=c.url, log=str(c.log))
        for c in state.components.values()
    ]


async def collect_status(settings: CliSettings, state: StackState | None) -> StatusReport:
    """Read every part of the report at once."""
    urls = stack_urls(settings, state)
    namespace = state.namespace if state is not None else settings.namespace
    problems: list[str] = []

    async def part(name: str, call: Callable[[], Awaitable[T]]) -> T | None:
        if state is not None and name in COMPONENTS and name not in state.components:
            return None  # the stack here was started without it: nothing to ask
        try:
            return await call()
        except Exception as error:  # one source down must not hide the others
            detail = str(error) or "no answer in time"
            problems.append(f"{name}: {type(error).__name__}: {detail}")
            return None

    timeout = httpx.Timeout(5.0, connect=2.0)
    async with httpx.AsyncClient(timeout=timeout) as client:
        services = Services(settings, urls, client)
        queues, runs, canaries, lines = await asyncio.gather(
            part(
                "queues",
                lambda: queue_report(
                    settings.management_url(),
                    settings.platform.rabbit_url.get_secret_value(),
                    namespace,
                ),
            ),
            part("trainer-dispatch", lambda: services.runs(limit=10)),
            part("rollout", lambda: services.canaries(limit=10)),
            part("mlflow", lambda: MlflowRegistry(client, urls["mlflow"]).lines()),
        )
    return StatusReport(
        namespace=namespace,
        components=component_views(state),
        queue_source=queues.source if queues is not None else None,
        queues=queues.queues if queues is not None else [],
        runs=runs or [],
        canaries=canaries or [],
        lines=lines or [],
        problems=problems,
    )


def _age(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "-"
    seconds = max(0, int((now - moment).total_seconds()))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


STATE_STYLES = {
    "succeeded": "green",
    "promoted": "green",
    "running": "cyan",
    "queued": "yellow",
    "paused": "yellow",
    "frozen": "yellow",
    "failed": "red",
    "rolled_back": "red",
    "cancelled": "dim",
}


def _state(value: str) -> Text:
    return Text(value, style=STATE_STYLES.get(value, ""))


def status_renderables(report: StatusReport) -> list[RenderableType]:
    """The report as rich tables, one per part, in loop order."""
    now = report.generated_at
    parts: list[RenderableType] = []
    if report.components:
        table = Table(title="Processes", title_justify="left", expand=False)
        for column in ("component", "state", "pid", "url"):
            table.add_column(column)
        for c in report.components:
            state = Text("running", "green") if c.running else Text("stopped", "red")
            table.add_row(c.name, state, _or_dash(c.pid), _or_dash(c.url))
        parts.append(table)
    else:
        parts.append(Text("No stack started by `flywheel up` here.", style="dim"))

    table = Table(title=f"Queues ({report.queue_source or 'unavailable'})", title_justify="left")
    for column in ("queue", "ready", "consumers", "DLQ"):
        table.add_column(column, justify="left" if column == "queue" else "right")
    for q in report.queues:
        dlq = Text(_or_dash(q.dlq_messages), style="red" if q.dlq_messages else "")
        table.add_row(q.name, str(q.messages), _or_dash(q.consumers), dlq)
    parts.append(table)

    table = Table(title="Training runs", title_justify="left")
    for column in ("run", "line", "state", "version", "reason", "created", "detail"):
        table.add_column(column)
    for r in report.runs:
        detail = r.failure_reason or ", ".join(
            f"{k}={v:.3f}" for k, v in sorted(r.metrics.items()) if "accuracy" in k
        )
        table.add_row(
            str(r.run_id)[:8],
            r.model_line,
            _state(r.state),
            _or_dash(r.model_version),
            r.reason,
            _age(r.created_at, now),
            detail,
        )
    parts.append(table)

    table = Table(title="Canaries (newest first)", title_justify="left")
    for column in ("line", "state", "candidate", "champion", "traffic", "checks", "started"):
        table.add_column(column)
    for canary in report.canaries:
        checks = "direct" if canary.direct else f"{canary.checks} ({canary.failed_checks} failed)"
        table.add_row(
            canary.model_line,
            _state(canary.state),
            f"v{canary.candidate_version}",
            "-" if canary.champion_version is None else f"v{canary.champion_version}",
            f"{canary.traffic_percent}%",
            checks,
            _age(canary.created_at, now),
        )
    parts.append(table)

    table = Table(title="Model lines (registry)", title_justify="left")
    for column in ("line", "champion", "held-out accuracy", "challenger", "latest", "versions"):
        table.add_column(column)
    for line in report.lines:
        accuracy = "-" if line.champion_accuracy is None else f"{line.champion_accuracy:.3f}"
        table.add_row(
            line.model_line,
            _or_dash(line.champion_version),
            accuracy,
            _or_dash(line.challenger_version),
            _or_dash(line.latest_version),
            str(line.versions),
        )
    parts.append(table)

    if report.problems:
        parts.append(Text("Problems:", style="bold red"))
        parts.extend(Text(f"  {problem}", style="red") for problem in report.problems)
    return parts


def render_status(report: StatusReport, console: Console) -> None:
    console.print(Group(*status_renderables(report)))
