"""Each of the six services (and the log worker) killed with SIGKILL in the middle of handling
an event, while the whole loop runs: labels → threshold → training → validation → canary.

Every service runs as deployed (``python -m …``, settings from the environment) with one
failpoint armed (``flywheel_runtime.failpoints``): it dies right after its handler committed
the event's effect and before the broker heard an acknowledgement, or, for labeling, after
the broker confirmed its ``labels.saved`` and before the outbox row was marked published. A
supervisor starts each dead process again without the failpoint, as Kubernetes restarts a
pod. The event comes again (redelivered, or published again by the outbox) and its effect
happens once: one label row per label, one retrain for the threshold crossed, one training
run and one model, one validation, one canary with one verdict, each inference log read once.
"""

import asyncio
import contextlib
import importlib
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from flywheel_contracts import (
    CanaryOutcome,
    CanaryVerdictV1,
    Event,
    InferenceLoggedV1,
    LabelsSavedV1,
    ModelTrainedV1,
    ModelValidatedV1,
    RolloutStepV1,
    ThresholdReachedV1,
    TrainingFailedV1,
)
from flywheel_inference_bff.logworker.reader import read_inference_logs
from flywheel_inference_bff.logworker.settings import LogWorkerSettings
from flywheel_rollout.policy import Margins
from flywheel_runtime.failpoints import ENV as FAILPOINTS
from flywheel_runtime.settings import ServiceSettings
from flywheel_runtime.storage import ObjectStorage
from flywheel_serving.triton import TritonServer
from flywheel_testing.events import EventProbe
from flywheel_testing.modules import load_file
from flywheel_testing.net import free_port
from flywheel_testing.processes import ServiceProcess
from flywheel_testing.rabbit import delete_names
from flywheel_testing.wait import wait_for

e2e = load_file(Path(__file__).parents[1] / "e2e" / "conftest.py", "flywheel_e2e_support")
loop = e2e.loop

# Four to five minutes on two cores: make test-hardening runs it, make test (CI) does not.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.hardening,
    pytest.mark.timeout(600),
]

LABELS = 400
"""As in the e2e loop test: enough for a test split and a model that beats an untrained one."""

POLICY = e2e.POLICY.model_copy(
    update={
        "threshold": 2,
        # Seven processes restarting on two cores: latency says little here, agreement nothing
        # (the champion is untrained). The test is about effects happening once.
        "margins": Margins(
            latency_p95=1.0, latency_p99=2.0, latency_slack_ms=1000.0, min_agreement=0.0
        ),
    }
)


@dataclass(frozen=True)
class Victim:
    """A service, how it is started, and where it dies."""

    name: str
    module: str
    failpoint: str


VICTIMS = (
    Victim("labeling", "flywheel_labeling", "outbox.published:labels.saved"),
    Victim("data-monitor", "flywheel_data_monitor", "handler.done:labels.saved"),
    Victim("trainer-dispatch", "flywheel_trainer_dispatch", "handler.done:threshold.reached"),
    Victim("validator", "flywheel_validator", "handler.done:model.trained"),
    Victim("rollout", "flywheel_rollout", "handler.done:model.validated"),
    Victim("inference-bff", "flywheel_inference_bff", "handler.done:rollout.step"),
    Victim("log-worker", "flywheel_inference_bff.logworker", "batch.written"),
)


class Supervisor:
    """Starts every victim with its failpoint, then restarts whichever dies, without it."""

    def __init__(self, processes: dict[str, ServiceProcess]) -> None:
        self.processes = processes
        self.restarts: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        for victim in VICTIMS:
            await self.processes[victim.name].start(**{FAILPOINTS: victim.failpoint})
        for name, process in self.processes.items():
            await wait_for(process.ready, timeout=180, interval=0.2, message=f"{name} ready")
        self._task = asyncio.create_task(self._watch(), name="supervisor")

    async def _watch(self) -> None:
        while True:
            for name, process in self.processes.items():
                if await process.restart_if_ended():
                    self.restarts[name] += 1
            await asyncio.sleep(0.1)  # a supervisor's poll, not a wait in the test

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for process in self.processes.values():
            await process.kill()


@pytest.fixture
async def supervised(
    loop: Any, mlflow_tracking_uri: str, triton_server: TritonServer, tmp_path: Path
) -> AsyncIterator[Supervisor]:
    loop.with_mlflow(mlflow_tracking_uri)
    # Deliveries are the retry budget of an event whose consumer is restarting.
    loop.platform = loop.platform.model_copy(update={"delivery_limit": 10})
    settings: dict[str, ServiceSettings] = {
        "labeling": loop.labeling_settings(http_port=free_port()),
        "data-monitor": loop.data_monitor_settings(http_port=free_port()),
        "trainer-dispatch": loop.trainer_settings(tmp_path / "runs", http_port=free_port()),
        "validator": loop.validator_settings(http_port=free_port()),
        "rollout": loop.rollout_settings(triton_server, POLICY, http_port=free_port()),
        "inference-bff": loop.bff_settings(triton_server, http_port=free_port()),
        "log-worker": LogWorkerSettings(
            platform=loop.platform,
            namespace=loop.topology.namespace,
            logs_bucket=loop.bucket,
            batch_size=50,
            max_wait_s=1.0,
            http_port=free_port(),
        ),
    }
    processes = {
        v.name: ServiceProcess(v.module, settings[v.name], tmp_path / f"{v.name}.log")
        for v in VICTIMS
    }
    supervisor = Supervisor(processes)
    try:
        yield supervisor
    finally:
        await supervisor.stop()
        await delete_names(loop.rabbit_url, _queues(settings), [])


def _queues(settings: dict[str, ServiceSettings]) -> list[str]:
    """The queues the processes declared, as their own apps name them (built, not started)."""
    names: set[str] = set()
    for victim in VICTIMS:
        create_app = importlib.import_module(f"{victim.module}.main").create_app
        names.update(create_app(settings[victim.name]).state.runtime.topology.queue_names)
    return sorted(names)


def once_each(events: Sequence[Event[Any]]) -> list[Event[Any]]:
    """The distinct events among ``events`` (an outbox may publish one twice after a crash)."""
    return list({e.event_id: e for e in events}.values())


async def test_every_service_killed_mid_event_redoes_nothing_twice(
    loop: Any,
    triton_server: TritonServer,
    supervised: Supervisor,
    storage: ObjectStorage,
    database_url: str,
) -> None:
    loop.stack.push_async_callback(loop.unserve, triton_server)
    champion = loop.register(seed=1)
    loop.mlflow().set_registered_model_alias(loop.model_line, "champion", champion)
    await loop.serve(triton_server, champion)
    probe = await loop.stack.enter_async_context(
        EventProbe(
            loop.rabbit_url,
            loop.topology,
            LabelsSavedV1,
            ThresholdReachedV1,
            ModelTrainedV1,
            TrainingFailedV1,
            ModelValidatedV1,
            RolloutStepV1,
            CanaryVerdictV1,
            InferenceLoggedV1,
            durable=True,
        )
    )
    started = datetime.now(UTC)
    await supervised.start()
    processes = supervised.processes
    labeling = await loop.stack.enter_async_context(
        httpx.AsyncClient(base_url=processes["labeling"].url, timeout=60)
    )
    bff = await loop.stack.enter_async_context(
        httpx.AsyncClient(base_url=processes["inference-bff"].url, timeout=60)
    )
    await e2e.create_project(labeling, loop, count=LABELS)
    tool = await loop.stack.enter_async_context(e2e.LabelingTool(loop, bff))
    await tool.served(champion, n=5)

    accepted = await e2e.post_mnist(labeling, loop, LABELS, through_restarts=True)

    rollout = await loop.stack.enter_async_context(
        httpx.AsyncClient(base_url=processes["rollout"].url, timeout=60)
    )
    [verdict] = await e2e.verdicts(probe, rollout, loop, timeout=420)
    candidate = verdict.payload.candidate_version
    # The BFF, killed at the canary's first step and started again, serves the outcome.
    rolled_back = verdict.payload.verdict is CanaryOutcome.ROLLED_BACK
    await tool.served(champion if rolled_back else candidate)
    await tool.stop()
    await probe.collect()

    async def every_log_read() -> bool:
        await probe.collect()
        table = await read_inference_logs(
            storage,
            loop.bucket,
            model_line=loop.model_line,
            since=started - timedelta(minutes=1),
            until=datetime.now(UTC) + timedelta(minutes=1),
        )
        read[:] = table.column("event_id").to_pylist()
        return {str(e.event_id) for e in probe.of(InferenceLoggedV1)} <= set(read)

    read: list[str] = []
    await wait_for(every_log_read, timeout=120, message="every inference log written to S3")
    stored_files = await storage.list_keys(loop.bucket, "")
    labels, runs = await _rows(database_url, loop)
    saved = probe.of(LabelsSavedV1)
    announced = {str(i) for e in saved for i in e.payload.label_ids}
    fired = once_each(probe.of(ThresholdReachedV1))
    trained = once_each(probe.of(ModelTrainedV1))
    validated = once_each(probe.of(ModelValidatedV1))
    verdicts = once_each(probe.of(CanaryVerdictV1))
    rollouts = {e.payload.rollout_id for e in probe.of(RolloutStepV1)}
    print(
        f"\nkilled={dict(sorted(supervised.restarts.items()))} "
        f"exits={ {n: p.exits for n, p in sorted(processes.items())} } "
        f"labels={len(labels)} labels_saved={len(saved)} (distinct {len(once_each(saved))}) "
        f"threshold_reached={len(probe.of(ThresholdReachedV1))} (distinct {len(fired)}) "
        f"training_runs={runs} model_trained={len(probe.of(ModelTrainedV1))} "
        f"model_validated={len(probe.of(ModelValidatedV1))} rollouts={len(rollouts)} "
        f"verdicts={len(probe.of(CanaryVerdictV1))} ({verdict.payload.verdict.value}) "
        f"steps={e2e.steps_of(probe.of(RolloutStepV1))} "
        f"inference_logs={len(probe.of(InferenceLoggedV1))} read_back={len(read)} "
        f"log_files={len([k for k in stored_files if k.endswith('.parquet')])} "
        f"predict_failures={dict(tool.failures)}"
    )

    for victim in VICTIMS:
        process = processes[victim.name]
        assert process.exits[:1] == [-9], (victim.name, process.exits, process.tail())
        assert f"failpoint {victim.failpoint} reached" in process.tail(10**7), victim.name
        assert supervised.restarts[victim.name] == 1, (victim.name, process.tail())
    # labeling: one row per label, every label announced; its announcement came twice.
    assert len(set(accepted)) == LABELS
    assert set(labels) == set(accepted)
    assert announced == set(accepted)
    assert len(saved) > len(once_each(saved)), "no labels.saved was published again"
    # data-monitor counted each label once: one retrain, for exactly the labels posted.
    assert len(fired) == 1
    assert fired[0].payload.labels_since_last == LABELS
    # trainer-dispatch: one run for that retrain; validator: one verdict for its model.
    assert runs == 1
    assert not probe.of(TrainingFailedV1)
    assert len(trained) == 1
    assert len(validated) == 1
    assert validated[0].payload.model_version == trained[0].payload.model_version == candidate
    # rollout: one canary, each step once, one verdict.
    assert len(rollouts) == 1
    assert len(verdicts) == 1
    steps = e2e.steps_of(probe.of(RolloutStepV1))
    assert len(steps) == len(set(steps)), steps
    # log worker: every log written, and read back once.
    assert len(read) == len(set(read))


async def _rows(database_url: str, loop: Any) -> tuple[list[str], int]:
    """Label ids in labeling's table and the number of training runs trainer-dispatch has."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            labels = await conn.execute(
                text(f'SELECT label_id::text FROM "{loop.schema("labeling")}".labels')  # noqa: S608
            )
            runs = await conn.execute(
                text(f'SELECT count(*) FROM "{loop.schema("trainer-dispatch")}".training_runs')  # noqa: S608
            )
            return [row[0] for row in labels], int(runs.scalar_one())
    finally:
        await engine.dispose()
