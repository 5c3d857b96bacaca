import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import httpx
from rich.console import Console

from flywheel_cli.queues import (
    QueueDepth,
    candidate_queues,
    from_amqp,
    is_stack_queue,
    pair_dead_letters,
)
from flywheel_cli.registry import LineView, MlflowRegistry
from flywheel_cli.services import CanaryView, RunView
from flywheel_cli.settings import CliSettings, Ports
from flywheel_cli.stack import free_ports
from flywheel_cli.status import ComponentView, StatusReport, collect_status, render_status
from flywheel_runtime.auth import generate_dev_key
from flywheel_runtime.topology import Topology
from flywheel_testing.rabbit import delete_names

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def fake_report() -> StatusReport:
    return StatusReport(
        generated_at=NOW,
        namespace="",
        components=[
            ComponentView(name="labeling", running=True, pid=101, url="http://127.0.0.1:8081"),
            ComponentView(name="validator", running=False, pid=102, url="http://127.0.0.1:8084"),
        ],
        queue_source="amqp",
        queues=[
            QueueDepth(name="validator.model.trained", messages=2, consumers=1, dlq_messages=1)
        ],
        runs=[
            RunView(
                run_id=uuid.UUID(int=7),
                state="succeeded",
                project_id="digits",
                model_line="digits-classifier",
                reason="count",
                model_version="3",
                created_at=NOW - timedelta(minutes=5),
                metrics={"val_accuracy": 0.9512},
            )
        ],
        canaries=[
            CanaryView(
                rollout_id=uuid.UUID(int=8),
                model_line="digits-classifier",
                state="running",
                candidate_version="3",
                champion_version="2",
                traffic_percent=50,
                checks=4,
                failed_checks=1,
                created_at=NOW - timedelta(seconds=30),
            )
        ],
        lines=[
            LineView(
                model_line="digits-classifier",
                champion_version="2",
                champion_accuracy=0.9431,
                challenger_version="3",
                latest_version="3",
                versions=3,
            )
        ],
        problems=["mlflow: ConnectError: refused"],
    )


def rendered(report: StatusReport) -> str:
    console = Console(record=True, width=200, color_system=None)
    render_status(report, console)
    return console.export_text()


def test_status_renders_every_part_of_the_report() -> None:
    text = rendered(fake_report())

    assert "labeling" in text
    assert "running" in text
    assert "stopped" in text
    assert "validator.model.trained" in text
    assert "val_accuracy=0.951" in text
    assert "5m ago" in text
    assert "50%" in text
    assert "4 (1 failed)" in text
    assert "0.943" in text
    assert "mlflow: ConnectError: refused" in text


def test_status_without_a_stack_says_so_and_still_shows_the_other_parts() -> None:
    text = rendered(StatusReport(generated_at=NOW))

    assert "No stack started by `flywheel up` here." in text
    assert "Queues (unavailable)" in text


def test_the_json_report_round_trips() -> None:
    report = fake_report()

    assert StatusReport.model_validate_json(report.model_dump_json()) == report
    assert json.loads(report.model_dump_json())["queues"][0]["dlq_messages"] == 1


def test_dead_letter_queues_fold_into_their_queue_row() -> None:
    rows = pair_dead_letters(
        {"a.x": (3, 1), "a.x.dlq": (2, 0), "b.y": (0, 1), "orphan.dlq": (5, 0)}
    )

    assert rows == [
        QueueDepth(name="a.x", messages=3, consumers=1, dlq_messages=2),
        QueueDepth(name="b.y", messages=0, consumers=1, dlq_messages=None),
        # Its queue is gone: the dead letters still show, under the queue's name.
        QueueDepth(name="orphan", messages=0, consumers=None, dlq_messages=5),
    ]


def test_replica_queues_fold_into_their_subscription_row_with_its_shared_dlq() -> None:
    rows = pair_dead_letters(
        {
            "inference-bff.rollout.step.r1": (1, 1),
            "inference-bff.rollout.step.r2": (2, 1),
            "inference-bff.rollout.step.dlq": (4, 0),
            "inference-bff.canary.verdict.r1": (0, 1),
            "rollout.model.validated": (0, 1),
        }
    )

    assert rows == [
        # No shared DLQ declared (an older BFF): the replica queue shows as it is.
        QueueDepth(name="inference-bff.canary.verdict.r1", messages=0, consumers=1),
        QueueDepth(name="inference-bff.rollout.step", messages=3, consumers=2, dlq_messages=4),
        QueueDepth(name="rollout.model.validated", messages=0, consumers=1),
    ]


def test_only_the_stack_namespace_service_queues_are_shown() -> None:
    assert is_stack_queue("validator.model.trained", "")
    assert is_stack_queue("t1-validator.model.trained", "t1-")
    assert not is_stack_queue("t2-validator.model.trained", "t1-")
    assert not is_stack_queue("probe-1234", "")
    assert "t1-rollout.model.validated.dlq" in candidate_queues("t1-")


async def test_status_reports_sources_that_do_not_answer_as_problems() -> None:
    closed = free_ports(4)
    settings = CliSettings(
        base_dir=Path("unused"),
        dev_signing_key=generate_dev_key(),
        ports=Ports(trainer_dispatch=closed[0], rollout=closed[1], mlflow=closed[2]),
        rabbit_management_url=f"http://127.0.0.1:{closed[3]}",
        platform={"rabbit_url": f"amqp://guest:guest@127.0.0.1:{closed[3]}/"},
    )

    report = await collect_status(settings, None)

    assert report.components == []
    assert {p.split(":")[0] for p in report.problems} == {
        "queues",
        "trainer-dispatch",
        "rollout",
        "mlflow",
    }


async def test_registry_lines_show_aliases_and_the_champion_held_out_accuracy() -> None:
    def mlflow(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/registered-models/search"):
            aliases = [
                {"alias": "champion", "version": "2"},
                {"alias": "challenger", "version": "3"},
            ]
            return httpx.Response(
                200, json={"registered_models": [{"name": "digits-classifier", "aliases": aliases}]}
            )
        versions = [
            {"name": "digits-classifier", "version": str(v), "tags": []} for v in (1, 3)
        ] + [
            {
                "name": "digits-classifier",
                "version": "2",
                "tags": [{"key": "validation.accuracy", "value": "0.9431"}],
            }
        ]
        return httpx.Response(200, json={"model_versions": versions})

    async with httpx.AsyncClient(transport=httpx.MockTransport(mlflow)) as client:
        lines = await MlflowRegistry(client, "http://mlflow").lines()

    assert lines == [
        LineView(
            model_line="digits-classifier",
            champion_version="2",
            champion_accuracy=0.9431,
            challenger_version="3",
            latest_version="3",
            versions=3,
        )
    ]


async def test_queue_depths_over_amqp_find_the_service_queues_and_their_dlqs(
    rabbit_url: str, topology: Topology
) -> None:
    namespace = topology.namespace
    queue, dlq = f"{namespace}validator.model.trained", f"{namespace}validator.model.trained.dlq"
    connection = await aio_pika.connect(rabbit_url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True)
        await channel.declare_queue(dlq, durable=True)
        for body in (b"1", b"2"):
            await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue)
        await channel.default_exchange.publish(aio_pika.Message(b"dead"), routing_key=dlq)

        report = await from_amqp(rabbit_url, namespace)
    finally:
        await connection.close()
        await delete_names(rabbit_url, [queue, dlq], [])

    assert report.source == "amqp"
    assert report.queues == [QueueDepth(name=queue, messages=2, consumers=0, dlq_messages=1)]
