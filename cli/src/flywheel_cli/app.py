"""The ``flywheel`` command: run the local stack, look at it, act on rollouts, play the demo."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from flywheel_cli.dlq import DlqError, non_empty, queue_of, replay
from flywheel_cli.endpoints import stack_urls
from flywheel_cli.infra import InfraError
from flywheel_cli.models import MlflowModels, RegistrationError, publish_trained
from flywheel_cli.queues import replica_queues
from flywheel_cli.scenarios import SCENARIOS, DemoError, DemoOptions
from flywheel_cli.services import (
    ACTIONS,
    Action,
    RunView,
    ServiceError,
    Services,
    TimelineEntry,
)
from flywheel_cli.settings import CliSettings
from flywheel_cli.stack import COMPONENTS, Stack, StackError
from flywheel_cli.state import StateFile, StateFileError
from flywheel_cli.status import collect_status, render_status
from flywheel_cli.supervise import StartError
from flywheel_cli.tokens import NoCredentialsError
from flywheel_cli.training import (
    TERMINAL,
    SubmitError,
    entry_point_for,
    follow,
    parse_hyperparameters,
    request_body,
)

app = typer.Typer(
    name="flywheel",
    help="Run Flywheel locally, watch its loop, and drive its rollouts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

EXPECTED_ERRORS = (
    InfraError,
    StackError,
    DemoError,
    StartError,
    StateFileError,
    ServiceError,
    NoCredentialsError,
    DlqError,
    RegistrationError,
    SubmitError,
    httpx.HTTPError,
)
"""Failures with a message that says it all: printed without a traceback, exit code 1."""


def console() -> Console:
    return Console(highlight=False)


def err_console() -> Console:
    return Console(stderr=True, highlight=False)


@contextmanager
def reported_errors() -> Iterator[None]:
    try:
        yield
    except EXPECTED_ERRORS as error:
        err_console().print(f"[bold red]error:[/] {error}", markup=True, soft_wrap=True)
        raise typer.Exit(1) from error


def settings_of(ctx: typer.Context) -> CliSettings:
    settings = ctx.obj
    if not isinstance(settings, CliSettings):
        raise RuntimeError("the CLI callback did not build the settings")
    return settings


@app.callback()
def main_callback(
    ctx: typer.Context,
    base_dir: Annotated[
        Path | None,
        typer.Option(
            "--base-dir",
            help="Folder of the local stack (state, logs, data); FLYWHEEL_CLI_BASE_DIR.",
        ),
    ] = None,
) -> None:
    """Build the settings once for whichever command runs."""
    settings = CliSettings()
    if base_dir is not None:
        settings = settings.model_copy(update={"base_dir": base_dir})
    ctx.obj = settings


def _split(services: str | None) -> list[str] | None:
    if services is None:
        return None
    return [name.strip() for name in services.split(",") if name.strip()]


@app.command()
def up(
    ctx: typer.Context,
    services: Annotated[
        str | None,
        typer.Option(
            "--services",
            help=f"Comma-separated subset of: {', '.join(COMPONENTS)} (servers they need are "
            "added).",
        ),
    ] = None,
    free_ports: Annotated[
        bool, typer.Option("--free-ports", help="Pick free ports instead of the defaults.")
    ] = False,
) -> None:
    """Start S3, MLflow, Triton and the services as local processes; wait until ready."""
    out = console()
    settings = settings_of(ctx)
    with reported_errors():
        stack = Stack(settings, report=lambda line: out.print(f"  {line}"))
        out.print(f"[bold]flywheel up[/] in {stack.base}")
        stack.up(_split(services), pick_free_ports=free_ports)
        state = StateFile(stack.settings.state_path).load()
    out.print(f"[green]ready[/]: logs in {stack.base / 'logs'}, state in {stack.state_file.path}")
    if state is not None:
        table = Table(show_header=True, header_style="bold")
        table.add_column("component")
        table.add_column("url")
        for name, url in state.urls.items():
            table.add_row(name, url)
        out.print(table)


@app.command()
def down(ctx: typer.Context) -> None:
    """Stop everything `flywheel up` started (SIGTERM, then SIGKILL after a timeout)."""
    out = console()
    with reported_errors():
        stack = Stack(settings_of(ctx), report=lambda line: out.print(f"  {line}"))
        results = stack.down()
    out.print("nothing was running" if not results else "[green]stopped[/]")


def run_async(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


@app.command()
def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Processes, queue depths and DLQs, training runs, canaries and champions."""
    settings = settings_of(ctx)
    with reported_errors():
        state = StateFile(settings.state_path).load()
        report = run_async(collect_status(settings, state))
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        render_status(report, console())


def http_client(settings: CliSettings) -> httpx.AsyncClient:
    """The HTTP client of one command; tests swap it for one with a mock transport."""
    return httpx.AsyncClient(timeout=settings.http_timeout_s)


async def _with_services(settings: CliSettings, call: Callable[[Services], Any]) -> Any:
    state = StateFile(settings.state_path).load()
    async with http_client(settings) as client:
        return await call(Services(settings, stack_urls(settings, state), client))


ACTION_HELP: dict[Action, str] = {
    "promote": "Promote the line's candidate to champion now, skipping the remaining steps.",
    "rollback": "Roll the line's canary back: all traffic to the champion.",
    "pause": "Hold the line's canary at its current step; checks stop counting.",
    "resume": "Resume a paused canary.",
    "freeze": "Freeze the line: no new canary starts, newly validated versions are refused.",
    "unfreeze": "Unfreeze the line: validated versions may start canaries again.",
}


def _register_action(action: Action) -> None:
    def command(
        ctx: typer.Context,
        model_line: Annotated[str, typer.Argument(help="Model line (registered model).")],
        reason: Annotated[
            str | None, typer.Option("--reason", help="Why; recorded in the timeline.")
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print rollout's answer.")] = False,
    ) -> None:
        settings = settings_of(ctx)
        with reported_errors():
            answer = run_async(
                _with_services(settings, lambda s: s.act(model_line, action, reason))
            )
        if as_json:
            typer.echo(json.dumps(answer, indent=2, default=str))
        else:
            console().print(f"[green]{action}[/] {model_line}: {_summary(answer)}")

    command.__name__ = action
    app.command(name=action, help=ACTION_HELP[action])(command)


def _summary(answer: Any) -> str:
    if not isinstance(answer, dict):
        return str(answer)
    keys = ("state", "candidate_version", "champion_version", "traffic_percent", "frozen")
    shown = {k: answer[k] for k in keys if answer.get(k) is not None}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or json.dumps(answer, default=str)


for _action in ACTIONS:
    _register_action(_action)


@app.command()
def timeline(
    ctx: typer.Context,
    model_line: Annotated[str, typer.Argument(help="Model line (registered model).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the entries as JSON.")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="Newest entries.")] = 200,
) -> None:
    """The audit timeline of a line: canaries, steps, checks, verdicts, operator actions."""
    settings = settings_of(ctx)
    with reported_errors():
        entries: list[TimelineEntry] = run_async(
            _with_services(settings, lambda s: s.timeline(model_line, limit))
        )
    if as_json:
        typer.echo(json.dumps([e.model_dump(mode="json") for e in entries], indent=2))
        return
    table = Table(title=f"Timeline of {model_line}", title_justify="left")
    for column in ("at", "kind", "actor", "summary"):
        table.add_column(column)
    for entry in entries:
        table.add_row(
            entry.at.astimezone().strftime("%H:%M:%S"), entry.kind, entry.actor, entry.summary
        )
    console().print(table)


@app.command()
def demo(
    ctx: typer.Context,
    scenario: Annotated[
        str, typer.Option("--scenario", help=f"One of: {', '.join(SCENARIOS)}.")
    ] = "normal",
    keep: Annotated[
        bool, typer.Option("--keep", help="Leave the stack running afterwards.")
    ] = False,
    free_ports: Annotated[
        bool, typer.Option("--free-ports", help="Start the stack on free ports if it is down.")
    ] = False,
) -> None:
    """Run the loop end to end on MNIST; the last line printed is one JSON summary.

    Exits 1 when the loop did not answer as the scenario expects (normal: promoted;
    poisoned: refused by quarantine, validator or canary).
    """
    if scenario not in SCENARIOS:
        raise typer.BadParameter(f"choose one of {', '.join(SCENARIOS)}", param_hint="--scenario")
    settings = settings_of(ctx)
    # Imported here: the demo pulls in PyTorch, which no other command needs.
    from flywheel_cli.demo import run_demo

    with reported_errors():
        summary = run_demo(
            settings,
            DemoOptions(scenario=scenario, keep=keep, free_ports=free_ports),
            console(),
        )
    typer.echo(json.dumps(summary, separators=(", ", ": ")))
    if not summary.get("expected"):
        raise typer.Exit(1)


dlq_app = typer.Typer(
    help="Dead-letter queues: list them, move their messages back.", no_args_is_help=True
)
app.add_typer(dlq_app, name="dlq")


@dlq_app.command("list")
def dlq_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
) -> None:
    """Each queue of the stack whose dead-letter queue holds messages, with its depth."""
    settings = settings_of(ctx)
    with reported_errors():
        state = StateFile(settings.state_path).load()
        namespace = state.namespace if state is not None else settings.namespace
        rows = run_async(
            non_empty(
                settings.management_url(),
                settings.platform.rabbit_url.get_secret_value(),
                namespace,
            )
        )
    if as_json:
        typer.echo(json.dumps([r.model_dump() for r in rows], indent=2))
        return
    if not rows:
        console().print("no dead letters")
        return
    table = Table(show_header=True, header_style="bold")
    table.add_column("queue")
    table.add_column("dead letters", justify="right")
    for row in rows:
        table.add_row(row.queue, str(row.messages))
    console().print(table)


@dlq_app.command("replay")
def dlq_replay(
    ctx: typer.Context,
    queue: Annotated[str, typer.Argument(help="Queue as `flywheel status` names it.")],
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Move at most this many.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would move; move nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Move the messages of `<queue>.dlq` back into `<queue>` (into each live replica's queue
    for a per-replica one), each acked after its confirm."""
    settings = settings_of(ctx)
    rabbit_url = settings.platform.rabbit_url.get_secret_value()
    with reported_errors():
        replicas = run_async(replica_queues(settings.management_url(), rabbit_url, queue_of(queue)))
        report = run_async(
            replay(rabbit_url, queue, limit=limit, dry_run=dry_run, replicas=replicas)
        )
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
        return
    out = console()
    verb, count = (
        ("would move", len(report.messages)) if report.dry_run else ("moved", report.moved)
    )
    into = ", ".join(report.targets) or report.queue
    out.print(f"{verb} {count} of {report.found} from {report.dead_letter_queue} to {into}")
    for message in report.messages:
        out.print(
            f"  {message.message_id or '-'}  {message.type or '-'}  reason={message.reason or '-'}"
            + (f"  error={message.error}" if message.error else "")
        )


@app.command()
def tune(
    ctx: typer.Context,
    model_line: Annotated[str, typer.Argument(help="Model line (registered model).")],
    version: Annotated[
        str | None, typer.Option("--version", help="Version to tune (default: the champion).")
    ] = None,
    max_p99_ms: Annotated[
        float | None, typer.Option("--max-p99-ms", help="p99 latency limit (ms).")
    ] = None,
    min_throughput: Annotated[
        float | None, typer.Option("--min-throughput", help="Throughput floor (requests/s).")
    ] = None,
    max_memory_mb: Annotated[
        float | None,
        typer.Option("--max-memory-mb", help="Memory limit of one configuration (MB)."),
    ] = None,
    triton_url: Annotated[
        str | None,
        typer.Option("--triton-url", help="Triton's HTTP host:port (default: the stack's)."),
    ] = None,
    metrics_url: Annotated[
        str | None,
        typer.Option("--metrics-url", help="Triton's /metrics URL, to measure memory."),
    ] = None,
    mlflow_uri: Annotated[
        str | None, typer.Option("--mlflow-uri", help="MLflow (default: the stack's).")
    ] = None,
    concurrency: Annotated[
        str | None, typer.Option("--concurrency", help="Levels, e.g. 1,4,16,64.")
    ] = None,
    requests: Annotated[
        int | None, typer.Option("--requests", min=1, help="Requests per configuration and level.")
    ] = None,
    max_batch_sizes: Annotated[
        str | None, typer.Option("--max-batch-sizes", help="Grid, e.g. 8,32,64.")
    ] = None,
    queue_delays_us: Annotated[
        str | None, typer.Option("--queue-delays-us", help="Grid, e.g. 0,500,2000.")
    ] = None,
    instances: Annotated[str | None, typer.Option("--instances", help="Grid, e.g. 1,2,4.")] = None,
    flavour: Annotated[
        str, typer.Option("--flavour", help="python (bundled Triton) or onnxruntime_onnx.")
    ] = "python",
    no_log: Annotated[
        bool, typer.Option("--no-log", help="Measure and print; record nothing in MLflow.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Profile a version under candidate Triton configurations; log the golden one.

    Exits 1 when no configuration meets the constraints.
    """
    # Imported here: the profiler pulls in tritonclient and matplotlib, no other command does.
    from flywheel_cli.tune import TuneRequest, parse_ints, run_tune
    from flywheel_runtime.errors import FlywheelError
    from flywheel_serving.repository import ServingOptions
    from flywheel_serving.tuning import Constraints, TuningGrid

    if flavour not in ("python", "onnxruntime_onnx"):
        raise typer.BadParameter("python or onnxruntime_onnx", param_hint="--flavour")
    settings = settings_of(ctx)
    default = TuningGrid()
    grid = TuningGrid(
        concurrencies=parse_ints(concurrency, default.concurrencies),
        requests_per_level=requests or default.requests_per_level,
        max_batch_sizes=parse_ints(max_batch_sizes, default.max_batch_sizes),
        max_queue_delays_us=parse_ints(queue_delays_us, default.max_queue_delays_us),
        instance_counts=parse_ints(instances, default.instance_counts),
    )
    limits = Constraints.model_validate(
        {
            key: value
            for key, value in (
                ("max_p99_ms", max_p99_ms),
                ("min_throughput_rps", min_throughput),
                ("max_memory_mb", max_memory_mb),
            )
            if value is not None
        }
    )
    request = TuneRequest(
        model_line=model_line,
        version=version,
        triton_url=triton_url,
        metrics_url=metrics_url,
        mlflow_uri=mlflow_uri,
        limits=limits,
        grid=grid,
        base=ServingOptions(flavour=flavour),  # type: ignore[arg-type]
        log=not no_log,
    )
    try:
        with reported_errors():
            outcome = run_async(run_tune(settings, request))
    except FlywheelError as error:
        err_console().print(f"[bold red]error:[/] {error.message}", markup=True, soft_wrap=True)
        raise typer.Exit(1) from error
    result = outcome.result
    if as_json:
        typer.echo(outcome.model_dump_json(indent=2))
    else:
        out = console()
        table = Table(title=f"{result.model_name} v{result.version} on {result.hardware}")
        for column in ("configuration", "vs", "concurrency", "rps", "p50 ms", "p99 ms", "MB"):
            table.add_column(column)
        for trial in result.trials:
            against = trial.against.label if trial.against else "-"
            if trial.error:
                table.add_row(trial.config.label, against, "-", "refused", "", "", "")
            for point in trial.points:
                table.add_row(
                    trial.config.label,
                    against,
                    str(point.concurrency),
                    f"{point.throughput_rps:.0f}",
                    f"{point.p50_ms:.1f}",
                    f"{point.p99_ms:.1f}",
                    "-" if trial.memory_mb is None else f"{trial.memory_mb:.0f}",
                )
        out.print(table)
        limits_text = result.constraints.model_dump_json(exclude_none=True)
        if result.golden is None:
            out.print(f"[red]no configuration met the constraints[/] {limits_text}")
        else:
            golden = result.golden
            out.print(
                f"[green]golden[/] {golden.config.label}: {golden.point.throughput_rps:.0f} rps, "
                f"p99 {golden.point.p99_ms:.1f} ms at concurrency {golden.point.concurrency} "
                f"(project {outcome.project_id or '-'}, limits {limits_text}); "
                + (f"logged to {outcome.artifacts_uri}" if outcome.artifacts_uri else "not logged")
            )
    if result.golden is None:
        raise typer.Exit(1)


train_app = typer.Typer(
    help="Training runs with a model line's own entry point, through trainer-dispatch.",
    no_args_is_help=True,
)
app.add_typer(train_app, name="train")


@train_app.command("submit")
def train_submit(
    ctx: typer.Context,
    entry_point: Annotated[
        str,
        typer.Argument(
            help="Script path or package.module:function (docs/bring-your-own-model.md); "
            "'line' for the model line's configured one."
        ),
    ],
    model_line: Annotated[str, typer.Option("--line", help="Model line to train.")],
    snapshot_id: Annotated[str, typer.Option("--snapshot", help="Dataset snapshot id.")],
    project_id: Annotated[
        str | None, typer.Option("--project", help="Project (default: the model line).")
    ] = None,
    nproc: Annotated[
        int | None, typer.Option("--nproc", min=1, max=64, help="Processes per node (DDP).")
    ] = None,
    params: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="Hyperparameter key=value (repeatable)."),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--follow/--no-follow", help="Follow the run until it ends.")
    ] = True,
    timeout_s: Annotated[
        float | None, typer.Option("--timeout", help="Stop following after this many seconds.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run as JSON.")] = False,
) -> None:
    """Start a training run through trainer-dispatch and follow it until it ends.

    Exits 1 when the run fails or is cancelled. A run that succeeds registers a version,
    which goes through validation and the canary like a retrained one.
    """
    settings = settings_of(ctx)
    out = console()
    with reported_errors():
        body = request_body(
            project_id=project_id or model_line,
            model_line=model_line,
            snapshot_id=snapshot_id,
            entry_point=None if entry_point == "line" else entry_point_for(entry_point),
            hyperparameters=parse_hyperparameters(params or []),
            nproc_per_node=nproc,
        )

        async def submit(services: Services) -> Any:
            run = await services.submit_run(body, uuid.uuid4())
            if not as_json:
                out.print(f"run [bold]{run.run_id}[/] {run.state} for {run.model_line}")
            if not wait:
                return run
            seen: dict[str, Any] = {"state": run.state}
            with out.status(f"{run.state}…") as spinner:

                def update(current: RunView) -> None:
                    if current.state != seen["state"] and not as_json:
                        out.print(f"  {current.state}")
                    seen["state"] = current.state
                    last = current.log_tail.strip().splitlines()[-1:] if current.log_tail else []
                    spinner.update(f"{current.state}… {last[0][:100] if last else ''}")

                return await follow(
                    services,
                    str(run.run_id),
                    on_update=update,
                    poll_s=settings.train_poll_s,
                    timeout_s=timeout_s,
                )

        final: RunView = run_async(_with_services(settings, submit))
    if as_json:
        typer.echo(final.model_dump_json(indent=2))
    elif final.state == "succeeded":
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(final.metrics.items()))
        out.print(
            f"[green]succeeded[/]: {final.registered_model} version {final.model_version} "
            f"(MLflow run {final.mlflow_run_id}) {metrics}",
            soft_wrap=True,
        )
    elif final.state in TERMINAL:
        out.print(f"[red]{final.state}[/]: {final.failure_reason or ''}", soft_wrap=True)
        if final.log_tail:
            out.print(final.log_tail, markup=False, highlight=False)
    else:
        out.print(f"still {final.state}: follow it with `flywheel status`")
    if final.state in TERMINAL and final.state != "succeeded":
        raise typer.Exit(1)


def _mlflow(settings: CliSettings, client: httpx.AsyncClient) -> MlflowModels:
    state = StateFile(settings.state_path).load()
    return MlflowModels(client, stack_urls(settings, state)["mlflow"])


@app.command()
def runs(
    ctx: typer.Context,
    model_line: Annotated[str, typer.Argument(help="Model line (its MLflow experiment).")],
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="Newest runs.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the runs as JSON.")] = False,
) -> None:
    """The MLflow runs of a model line, newest first, with the versions they registered."""
    settings = settings_of(ctx)

    async def read() -> Any:
        async with http_client(settings) as client:
            return await _mlflow(settings, client).runs(model_line, limit)

    with reported_errors():
        rows = run_async(read())
    if as_json:
        typer.echo(json.dumps([r.model_dump(mode="json") for r in rows], indent=2))
        return
    table = Table(title=f"Runs of {model_line}", title_justify="left")
    for column in ("run", "status", "started", "entry point", "val_accuracy", "versions"):
        table.add_column(column)
    for row in rows:
        accuracy = row.metrics.get("val_accuracy")
        table.add_row(
            row.run_id,
            row.status,
            row.started_at.astimezone().strftime("%Y-%m-%d %H:%M") if row.started_at else "-",
            row.entry_point or "-",
            "-" if accuracy is None else f"{accuracy:.4f}",
            ", ".join(row.versions) or "-",
        )
    console().print(table)


models_app = typer.Typer(
    help="Registered versions of a model line; register an experiment run.", no_args_is_help=True
)
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(
    ctx: typer.Context,
    model_line: Annotated[str, typer.Argument(help="Model line (registered model).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the versions as JSON.")] = False,
) -> None:
    """Every registered version of a model line with its aliases and validation verdict."""
    settings = settings_of(ctx)

    async def read() -> Any:
        async with http_client(settings) as client:
            return await _mlflow(settings, client).versions(model_line)

    with reported_errors():
        rows = run_async(read())
    if as_json:
        typer.echo(json.dumps([r.model_dump(mode="json") for r in rows], indent=2))
        return
    table = Table(title=f"Versions of {model_line}", title_justify="left")
    for column in ("version", "aliases", "verdict", "accuracy", "entry point", "run"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.version,
            ", ".join(row.aliases) or "-",
            row.verdict or "-",
            "-" if row.accuracy is None else f"{row.accuracy:.4f}",
            row.entry_point or "-",
            row.run_id or "-",
        )
    console().print(table)


@models_app.command("register")
def models_register(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="MLflow run that logged a model/ folder.")],
    model_line: Annotated[
        str | None, typer.Option("--line", help="Model line (default: the run's tag).")
    ] = None,
    project_id: Annotated[
        str | None, typer.Option("--project", help="Project (default: the run's tag).")
    ] = None,
    snapshot_id: Annotated[
        str | None, typer.Option("--snapshot", help="Snapshot (default: the run's tag).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the registration.")] = False,
) -> None:
    """Register an experiment run as a version of its model line and announce it with
    model.trained: the validator judges it and rollout canaries it like a retrained one."""
    settings = settings_of(ctx)
    state = StateFile(settings.state_path).load()
    namespace = state.namespace if state is not None else settings.namespace

    async def register() -> Any:
        async with http_client(settings) as client:
            registration, event = await _mlflow(settings, client).register_run(
                run_id, model_line=model_line, project_id=project_id, snapshot_id=snapshot_id
            )
        await publish_trained(settings.platform.rabbit_url.get_secret_value(), namespace, event)
        return registration

    with reported_errors():
        registration = run_async(register())
    if as_json:
        typer.echo(registration.model_dump_json(indent=2))
        return
    verb = "registered" if registration.created else "already registered"
    console().print(
        f"[green]{verb}[/] run {run_id} as {registration.registered_model} version "
        f"{registration.version}; model.trained published ({registration.event_id}): "
        "validation and the canary follow",
        soft_wrap=True,
    )


def main() -> None:
    """Console-script entry point."""
    app()
