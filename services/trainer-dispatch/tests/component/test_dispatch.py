import asyncio
import copy
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from faststream.rabbit import RabbitBroker, TestRabbitBroker

from flywheel_contracts import Event, ModelTrainedV1, ThresholdReachedV1, TrainingFailedV1
from flywheel_contracts.events import ThresholdReason
from flywheel_runtime.auth import AuthSettings, TokenVerifier, generate_dev_key, issue_dev_token
from flywheel_runtime.http import install_error_handlers
from flywheel_runtime.messaging import create_broker
from flywheel_runtime.settings import PlatformSettings
from flywheel_runtime.topology import Topology
from flywheel_testing.kubeapi import KubeApiServer
from flywheel_trainer_dispatch.adapters.kubernetes import KubernetesBackend
from flywheel_trainer_dispatch.adapters.local import TrainingOptions
from flywheel_trainer_dispatch.api import router
from flywheel_trainer_dispatch.errors import LaunchError
from flywheel_trainer_dispatch.handlers import register
from flywheel_trainer_dispatch.outcomes import LOST_WHILE_DOWN
from flywheel_trainer_dispatch.ports import (
    ACTIVE_STATES,
    Phase,
    RunFilter,
    RunHandle,
    RunSpec,
    RunState,
    RunStatus,
    TrainingOutput,
    TrainingRun,
)
from flywheel_trainer_dispatch.scheduler import Priority, Scheduler
from flywheel_trainer_dispatch.service import RunRequest, TrainerDispatch
from flywheel_trainer_dispatch.settings import KubernetesSettings

START = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
OWNER = "instance-a"


# --- fakes of the ports -------------------------------------------------------------------------


@dataclass
class FakeStore:
    """The RunStore port in memory: transactions are serialized and apply only on success."""

    runs_: dict[uuid.UUID, TrainingRun] = field(default_factory=dict)
    claimed: set[uuid.UUID] = field(default_factory=set)
    outbox: list[Event[Any]] = field(default_factory=list)
    positions: int = 0
    now: datetime = START
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator["FakeTransaction"]:
        async with self.lock:
            tx = FakeTransaction(copy.deepcopy(self))
            yield tx
            self.runs_ = tx.view.runs_
            self.claimed = tx.view.claimed
            self.outbox = tx.view.outbox
            self.positions = tx.view.positions
            self._check_invariants()

    def __deepcopy__(self, memo: dict[int, Any]) -> "FakeStore":
        return FakeStore(
            runs_={k: v.model_copy(deep=True) for k, v in self.runs_.items()},
            claimed=set(self.claimed),
            outbox=list(self.outbox),
            positions=self.positions,
            now=self.now,
        )

    def _check_invariants(self) -> None:
        # What the partial unique indexes guarantee in PostgreSQL.
        for states in ({RunState.QUEUED}, ACTIVE_STATES):
            lines = [r.model_line for r in self.runs_.values() if r.state in states]
            assert len(lines) == len(set(lines)), f"two runs of one line in {states}"

    async def run(self, run_id: uuid.UUID) -> TrainingRun | None:
        return self.runs_.get(run_id)

    async def runs(self, where: RunFilter) -> list[TrainingRun]:
        found = [
            r
            for r in self.runs_.values()
            if (not where.states or r.state in where.states)
            and where.project_id in (None, r.project_id)
            and where.model_line in (None, r.model_line)
        ]
        found.sort(key=lambda r: r.queue_position or 0, reverse=True)
        return found[: where.limit]

    async def active_runs(self, owner: str) -> list[TrainingRun]:
        return [r for r in self.runs_.values() if r.owner == owner and r.state.active]

    async def stale_runs(self, owner: str, silent_since: datetime) -> list[TrainingRun]:
        return [
            r
            for r in self.runs_.values()
            if r.state.active
            and r.owner != owner
            and (r.heartbeat_at or r.created_at or START) < silent_since
        ]

    def events(self, event_type: type[Event[Any]]) -> list[Any]:
        return [e for e in self.outbox if isinstance(e, event_type)]

    def state(self, run_id: uuid.UUID) -> RunState:
        return self.runs_[run_id].state

    def in_state(self, state: RunState) -> list[TrainingRun]:
        return [r for r in self.runs_.values() if r.state is state]


class FakeTransaction:
    def __init__(self, view: FakeStore) -> None:
        self.view = view

    async def claim(self, event_id: uuid.UUID) -> bool:
        if event_id in self.view.claimed:
            return False
        self.view.claimed.add(event_id)
        return True

    async def lock_line(self, model_line: str) -> None:
        assert model_line  # transactions here are serialized already

    async def try_lock_scheduler(self) -> bool:
        return True

    async def run_by_trigger(self, trigger_event_id: uuid.UUID) -> TrainingRun | None:
        return next(
            (r for r in self.view.runs_.values() if r.trigger_event_id == trigger_event_id), None
        )

    async def waiting_run(self, model_line: str) -> TrainingRun | None:
        return next(
            (
                r
                for r in self.view.runs_.values()
                if r.model_line == model_line and r.state is RunState.QUEUED
            ),
            None,
        )

    async def waiting_runs(self) -> list[TrainingRun]:
        return [r for r in self.view.runs_.values() if r.state is RunState.QUEUED]

    async def active_lines(self) -> list[str]:
        return [r.model_line for r in self.view.runs_.values() if r.state.active]

    async def lock_run(self, run_id: uuid.UUID) -> TrainingRun | None:
        return self.view.runs_.get(run_id)

    async def add_run(self, run: TrainingRun) -> TrainingRun:
        assert run.run_id not in self.view.runs_
        assert run.trigger_event_id not in {r.trigger_event_id for r in self.view.runs_.values()}
        self.view.positions += 1
        added = run.model_copy(
            update={
                "queue_position": run.queue_position or self.view.positions,
                "created_at": self.view.now,
            }
        )
        self.view.runs_[run.run_id] = added
        return added.model_copy()

    async def save_run(self, run: TrainingRun) -> None:
        self.view.runs_[run.run_id] = run.model_copy(deep=True)

    async def heartbeat(self, owner: str, at: datetime) -> None:
        for run in self.view.runs_.values():
            if run.owner == owner and run.state.active:
                run.heartbeat_at = at

    async def emit(self, event: Event[Any]) -> None:
        self.view.outbox.append(event)


@dataclass
class FakeBackend:
    """The TrainingBackend port: runs do what the test says."""

    name: str = "local"
    phases: dict[uuid.UUID, Phase] = field(default_factory=dict)
    exit_codes: dict[uuid.UUID, int | None] = field(default_factory=dict)
    outputs: dict[uuid.UUID, TrainingOutput] = field(default_factory=dict)
    recovered: dict[uuid.UUID, Phase] = field(default_factory=dict)
    launched: list[RunSpec] = field(default_factory=list)
    cancelled: list[uuid.UUID] = field(default_factory=list)
    refuse: bool = False

    async def launch(self, spec: RunSpec) -> RunHandle:
        if self.refuse:
            raise LaunchError("could not start training: no such program")
        self.launched.append(spec)
        self.phases[spec.run_id] = Phase.RUNNING
        return RunHandle(
            backend=self.name,
            run_id=spec.run_id,
            command=["python", "-m", "flywheel_vision.train", str(spec.run_id)],
            details={"pid": 1000 + len(self.launched)},
        )

    async def poll(self, handle: RunHandle) -> RunStatus:
        run_id = handle.run_id
        return RunStatus(
            phase=self.phases[run_id],
            exit_code=self.exit_codes.get(run_id),
            output=self.outputs.get(run_id),
            log_tail=f"log of {run_id}",
            handle=handle,
        )

    async def cancel(self, handle: RunHandle) -> None:
        self.cancelled.append(handle.run_id)
        self.phases[handle.run_id] = Phase.FAILED
        self.exit_codes[handle.run_id] = -15

    async def recover(self, handle: RunHandle) -> RunStatus:
        phase = self.recovered.get(handle.run_id, Phase.LOST)
        if phase is Phase.RUNNING:
            self.phases[handle.run_id] = Phase.RUNNING
        return RunStatus(
            phase=phase,
            exit_code=self.exit_codes.get(handle.run_id),
            output=self.outputs.get(handle.run_id),
            handle=handle,
        )

    async def read_log(self, handle: RunHandle) -> str | None:
        return f"whole log of {handle.run_id}\n"

    def succeed(self, run_id: uuid.UUID, version: str = "1") -> TrainingOutput:
        output = TrainingOutput(
            run_id=f"mlflow-{run_id.hex[:8]}",
            model_name="digits-classifier",
            version=version,
            base_version=None if version == "1" else str(int(version) - 1),
            metrics={"val_accuracy": 0.9, "train_loss": 0.3},
            training_run_id=str(run_id),
        )
        self.phases[run_id] = Phase.SUCCEEDED
        self.exit_codes[run_id] = 0
        self.outputs[run_id] = output
        return output

    def crash(self, run_id: uuid.UUID, exit_code: int) -> None:
        self.phases[run_id] = Phase.FAILED
        self.exit_codes[run_id] = exit_code


@dataclass
class Clock:
    now: datetime = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


# --- harness ------------------------------------------------------------------------------------


def threshold_event(
    line: str = "digits-classifier", reason: ThresholdReason = ThresholdReason.COUNT
) -> ThresholdReachedV1:
    return ThresholdReachedV1.model_validate(
        {
            "payload": {
                "project_id": "digits",
                "model_line": line,
                "snapshot_id": f"snap-{uuid.uuid4().hex[:8]}",
                "reason": reason,
                "decision_id": uuid.uuid4(),
                "labels_since_last": 100,
                "threshold": 100,
                "excluded_label_ids": [uuid.UUID(int=7), uuid.UUID(int=3)],
            }
        }
    )


@dataclass
class Harness:
    store: FakeStore
    backend: FakeBackend
    clock: Clock
    dispatch: TrainerDispatch
    broker: RabbitBroker
    topology: Topology

    def trigger(
        self, line: str = "digits-classifier", reason: ThresholdReason = ThresholdReason.COUNT
    ) -> ThresholdReachedV1:
        return threshold_event(line, reason)

    async def publish(self, *events: ThresholdReachedV1) -> None:
        for event in events:
            await self.broker.publish(
                event.model_dump(mode="json"),
                exchange=self.topology.exchange_for(ThresholdReachedV1),
                routing_key=event.routing_key(),
            )

    def run_of(self, event: ThresholdReachedV1) -> TrainingRun:
        return next(r for r in self.store.runs_.values() if r.trigger_event_id == event.event_id)

    def client(self, app: FastAPI | None = None) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app or api_app(self.dispatch))
        return httpx.AsyncClient(transport=transport, base_url="http://test")


def api_app(dispatch: TrainerDispatch, verifier: TokenVerifier | None = None) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.dispatch = dispatch
    if verifier is not None:
        app.state.token_verifier = verifier
    return app


async def _harness(max_concurrent: int = 1, timeout_s: float = 600) -> AsyncIterator[Harness]:
    clock = Clock()
    store, backend = FakeStore(), FakeBackend()
    dispatch = TrainerDispatch(
        store,
        backend,
        Scheduler(max_concurrent),
        owner=OWNER,
        registered_model=lambda _project, line: line,
        timeout_s=timeout_s,
        lost_after_s=60,
        clock=clock,
    )
    broker = create_broker("amqp://guest:guest@localhost:5672/", app_id="trainer-dispatch")
    topology = Topology(namespace="component.")
    register(broker, topology, dispatch)
    async with TestRabbitBroker(broker) as test_broker:
        yield Harness(store, backend, clock, dispatch, test_broker, topology)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    async for built in _harness():
        yield built


@pytest.fixture
async def wide() -> AsyncIterator[Harness]:
    async for built in _harness(max_concurrent=2):
        yield built


# --- triggers and outcomes ----------------------------------------------------------------------


async def test_a_threshold_event_queues_one_run_however_often_it_is_delivered(
    harness: Harness,
) -> None:
    event = harness.trigger()

    await harness.publish(event, event, event)

    [run] = harness.store.runs_.values()
    assert run.state is RunState.QUEUED
    assert run.trigger_event_id == event.event_id
    assert run.correlation_id == event.correlation_id
    assert run.priority is Priority.THRESHOLD
    assert run.reason == "count"
    assert run.registered_model == "digits-classifier"
    assert run.excluded_label_ids == [uuid.UUID(int=3), uuid.UUID(int=7)]
    assert harness.dispatch.changed.is_set()


async def test_a_run_that_registers_a_version_emits_model_trained_in_the_triggers_chain(
    harness: Harness,
) -> None:
    event = harness.trigger()
    await harness.publish(event)

    await harness.dispatch.tick()
    run = harness.run_of(event)
    [spec] = harness.backend.launched
    output = harness.backend.succeed(run.run_id)
    await harness.dispatch.tick()

    assert spec.run_id == run.run_id
    assert spec.correlation_id == event.correlation_id
    assert spec.excluded_label_ids == (uuid.UUID(int=3), uuid.UUID(int=7))
    [trained] = harness.store.events(ModelTrainedV1)
    assert trained.correlation_id == event.correlation_id
    assert trained.causation_id == event.event_id
    assert trained.payload.training_run_id == run.run_id
    assert trained.payload.mlflow_run_id == output.run_id
    assert (trained.payload.registered_model, trained.payload.model_version) == (
        "digits-classifier",
        "1",
    )
    assert trained.payload.base_model_version is None
    assert trained.payload.backend == "local"
    assert trained.payload.metrics == {"val_accuracy": 0.9, "train_loss": 0.3}
    assert trained.payload.snapshot_id == event.payload.snapshot_id
    done = harness.run_of(event)
    assert done.state is RunState.SUCCEEDED
    assert done.started_at == done.finished_at == START
    assert done.model_version == "1"
    assert done.command is not None


async def test_a_failed_process_emits_training_failed_with_its_exit_code(
    harness: Harness,
) -> None:
    event = harness.trigger()
    await harness.publish(event)
    await harness.dispatch.tick()
    run_id = harness.run_of(event).run_id

    harness.backend.crash(run_id, 1)
    await harness.dispatch.tick()

    [failed] = harness.store.events(TrainingFailedV1)
    assert failed.causation_id == event.event_id
    assert failed.correlation_id == event.correlation_id
    assert failed.payload.reason == "training exited with code 1"
    assert not failed.payload.retryable
    run = harness.run_of(event)
    assert run.state is RunState.FAILED
    assert run.exit_code == 1
    assert run.log_tail == f"log of {run_id}"


async def test_a_run_past_its_timeout_is_stopped_and_fails() -> None:
    async for harness in _harness(timeout_s=30):
        event = harness.trigger()
        await harness.publish(event)
        await harness.dispatch.tick()
        run_id = harness.run_of(event).run_id

        harness.clock.advance(29)
        await harness.dispatch.tick()
        assert harness.store.state(run_id) is RunState.RUNNING
        harness.clock.advance(2)
        await harness.dispatch.tick()

        assert harness.backend.cancelled == [run_id]
        [failed] = harness.store.events(TrainingFailedV1)
        assert failed.payload.reason == "timed out after 30s; its processes were killed"
        assert harness.run_of(event).exit_code == -15


async def test_a_run_that_cannot_launch_fails_and_frees_its_slot(harness: Harness) -> None:
    harness.backend.refuse = True
    first, second = harness.trigger("a"), harness.trigger("b")
    await harness.publish(first, second)

    await harness.dispatch.tick()

    failed = harness.store.events(TrainingFailedV1)
    assert [f.payload.model_line for f in failed] == ["a", "b"]
    assert failed[0].payload.reason == "could not start training: no such program"


# --- scheduling ---------------------------------------------------------------------------------


async def test_a_trigger_for_a_busy_line_waits_and_a_newer_one_replaces_it(
    harness: Harness,
) -> None:
    first, second, third = harness.trigger(), harness.trigger(), harness.trigger()
    await harness.publish(first)
    await harness.dispatch.tick()

    await harness.publish(second)
    await harness.dispatch.tick()
    assert harness.run_of(second).state is RunState.QUEUED
    await harness.publish(third)

    replaced = harness.run_of(second)
    assert replaced.state is RunState.SUPERSEDED
    assert replaced.superseded_by == harness.run_of(third).run_id
    assert harness.run_of(third).queue_position == replaced.queue_position
    harness.backend.succeed(harness.run_of(first).run_id)
    await harness.dispatch.tick()
    assert harness.run_of(third).state is RunState.RUNNING
    assert [s.snapshot_id for s in harness.backend.launched] == [
        first.payload.snapshot_id,
        third.payload.snapshot_id,
    ]
    assert harness.store.events(TrainingFailedV1) == []


async def test_when_a_slot_frees_drift_goes_first_then_threshold_then_manual(
    harness: Harness,
) -> None:
    busy = harness.trigger("busy")
    await harness.publish(busy)
    await harness.dispatch.tick()
    manual = await harness.dispatch.request_run(_request("manual-line", Priority.MANUAL))
    threshold = harness.trigger("threshold-line")
    drift = harness.trigger("drift-line", ThresholdReason.DRIFT)
    await harness.publish(threshold, drift)

    order = []
    running = harness.run_of(busy).run_id
    for _ in range(3):
        harness.backend.succeed(running)
        await harness.dispatch.tick()
        [started] = harness.store.in_state(RunState.RUNNING)
        order.append(started.model_line)
        running = started.run_id

    assert order == ["drift-line", "threshold-line", "manual-line"]
    assert harness.store.runs_[manual.run_id].state is RunState.RUNNING


async def test_the_global_bound_holds_across_lines(wide: Harness) -> None:
    events = [wide.trigger(line) for line in ("a", "b", "c")]
    await wide.publish(*events)

    await wide.dispatch.tick()

    assert [s.model_line for s in wide.backend.launched] == ["a", "b"]
    assert wide.run_of(events[2]).state is RunState.QUEUED
    wide.backend.succeed(wide.run_of(events[0]).run_id)
    await wide.dispatch.tick()
    assert wide.run_of(events[2]).state is RunState.RUNNING


# --- cancel -------------------------------------------------------------------------------------


async def test_cancelling_a_queued_run_ends_it_at_once(harness: Harness) -> None:
    busy, waiting = harness.trigger(), harness.trigger()
    await harness.publish(busy)
    await harness.dispatch.tick()
    await harness.publish(waiting)

    cancelled = await harness.dispatch.cancel(harness.run_of(waiting).run_id)

    assert cancelled.state is RunState.CANCELLED
    [failed] = harness.store.events(TrainingFailedV1)
    assert failed.payload.reason == "cancelled by an operator before it started"
    assert failed.causation_id == waiting.event_id


async def test_cancelling_a_running_run_stops_its_processes_through_the_watcher(
    harness: Harness,
) -> None:
    event = harness.trigger()
    await harness.publish(event)
    await harness.dispatch.tick()
    run_id = harness.run_of(event).run_id

    requested = await harness.dispatch.cancel(run_id)
    assert requested.state is RunState.RUNNING
    assert requested.cancel_requested_at == START
    await harness.dispatch.tick()

    assert harness.backend.cancelled == [run_id]
    assert harness.store.state(run_id) is RunState.CANCELLED
    [failed] = harness.store.events(TrainingFailedV1)
    assert failed.payload.reason == "cancelled by an operator"


# --- recovery -----------------------------------------------------------------------------------


async def _running_runs(harness: Harness, *lines: str) -> list[uuid.UUID]:
    events = [harness.trigger(line) for line in lines]
    await harness.publish(*events)
    await harness.dispatch.tick()
    return [harness.run_of(e).run_id for e in events]


async def test_after_a_restart_a_live_run_is_reattached_and_a_vanished_one_fails(
    wide: Harness,
) -> None:
    alive, gone = await _running_runs(wide, "alive", "gone")
    wide.backend.recovered = {alive: Phase.RUNNING, gone: Phase.LOST}

    await wide.dispatch.recover()

    assert wide.store.state(alive) is RunState.RUNNING
    assert wide.store.state(gone) is RunState.FAILED
    [failed] = wide.store.events(TrainingFailedV1)
    assert failed.payload.training_run_id == gone
    assert failed.payload.reason == LOST_WHILE_DOWN
    assert failed.payload.retryable
    wide.backend.succeed(alive)
    await wide.dispatch.tick()
    [trained] = wide.store.events(ModelTrainedV1)
    assert trained.payload.training_run_id == alive


async def test_a_run_that_finished_while_down_is_announced(harness: Harness) -> None:
    [run_id] = await _running_runs(harness, "a")
    harness.backend.succeed(run_id)
    harness.backend.recovered = {run_id: Phase.SUCCEEDED}

    await harness.dispatch.recover()

    [trained] = harness.store.events(ModelTrainedV1)
    assert trained.payload.training_run_id == run_id


async def test_a_run_chosen_but_never_launched_goes_back_to_the_queue(harness: Harness) -> None:
    event = harness.trigger()
    await harness.publish(event)
    run = harness.run_of(event)
    run.state, run.owner = RunState.STARTING, OWNER
    harness.store.runs_[run.run_id] = run
    harness.backend.recovered = {run.run_id: Phase.NOT_STARTED}

    await harness.dispatch.recover()
    assert harness.store.state(run.run_id) is RunState.QUEUED
    await harness.dispatch.tick()

    assert harness.store.state(run.run_id) is RunState.RUNNING
    assert harness.store.outbox == []


async def test_runs_of_an_instance_that_stopped_reporting_are_failed(harness: Harness) -> None:
    event = harness.trigger()
    await harness.publish(event)
    run = harness.run_of(event)
    run.state, run.owner, run.heartbeat_at = RunState.RUNNING, "instance-b", START
    harness.store.runs_[run.run_id] = run

    harness.clock.advance(30)
    await harness.dispatch.tick()
    assert harness.store.state(run.run_id) is RunState.RUNNING
    harness.clock.advance(31)
    await harness.dispatch.tick()

    [failed] = harness.store.events(TrainingFailedV1)
    assert failed.payload.reason == (
        "lost: its trainer-dispatch instance 'instance-b' has not reported for 61s"
    )
    assert failed.payload.retryable


# --- the operator API ---------------------------------------------------------------------------


def _request(line: str, priority: Priority) -> RunRequest:
    return RunRequest(
        project_id="digits", model_line=line, snapshot_id="snap-api", priority=priority
    )


async def test_the_api_lists_shows_and_logs_runs(harness: Harness) -> None:
    running, waiting, other = harness.trigger(), harness.trigger(), harness.trigger("other")
    await harness.publish(running)
    await harness.dispatch.tick()
    await harness.publish(waiting)
    await harness.publish(other)
    run_id = harness.run_of(running).run_id

    async with harness.client() as client:
        everything = (await client.get("/v1/runs")).json()["runs"]
        queued = (await client.get("/v1/runs", params={"state": "queued"})).json()["runs"]
        line = (await client.get("/v1/runs", params={"model_line": "other"})).json()["runs"]
        detail = (await client.get(f"/v1/runs/{run_id}")).json()
        log = await client.get(f"/v1/runs/{run_id}/log")
        missing = await client.get(f"/v1/runs/{uuid.uuid4()}")

    assert len(everything) == 3
    assert {r["model_line"] for r in queued} == {"digits-classifier", "other"}
    assert [r["run_id"] for r in line] == [str(harness.run_of(other).run_id)]
    assert detail["state"] == "running"
    assert detail["backend"] == "local"
    assert detail["command"][:3] == ["python", "-m", "flywheel_vision.train"]
    assert detail["excluded_label_count"] == 2
    assert detail["started_at"] is not None
    assert "log_tail" in detail
    assert log.text == f"whole log of {run_id}\n"
    assert log.headers["x-flywheel-log-complete"] == "true"
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "run_not_found"


async def test_the_api_triggers_idempotently_and_cancels(harness: Harness) -> None:
    key = str(uuid.uuid4())
    body = {"project_id": "digits", "model_line": "digits-classifier", "snapshot_id": "snap-9"}

    async with harness.client() as client:
        first = await client.post("/v1/runs", json=body, headers={"Idempotency-Key": key})
        again = await client.post("/v1/runs", json=body, headers={"Idempotency-Key": key})
        scheduled = await client.post("/v1/runs", json=body | {"priority": "scheduled"})
        refused = await client.post("/v1/runs", json=body | {"priority": "drift"})
        run_id = scheduled.json()["run_id"]
        cancelled = await client.post(f"/v1/runs/{run_id}/cancel")
        twice = await client.post(f"/v1/runs/{run_id}/cancel")

    assert first.status_code == 202
    assert first.json()["run_id"] == again.json()["run_id"]
    assert first.json()["source"] == "api"
    assert first.json()["requested_by"] == "anonymous"
    assert scheduled.json()["priority"] == "scheduled"
    assert harness.store.state(uuid.UUID(first.json()["run_id"])) is RunState.SUPERSEDED
    assert refused.status_code == 422
    assert cancelled.status_code == 202
    assert cancelled.json()["state"] == "cancelled"
    assert twice.status_code == 409
    assert twice.json()["error"]["code"] == "run_finished"


async def test_with_auth_reading_needs_a_token_and_changing_the_operator_role(
    harness: Harness,
) -> None:
    key = generate_dev_key()
    verifier = TokenVerifier(AuthSettings(dev_signing_key=key))
    app = api_app(harness.dispatch, verifier)
    viewer = issue_dev_token(key, subject="viewer")
    operator = issue_dev_token(key, subject="op-1", roles=["operator"])
    body = {"project_id": "digits", "model_line": "digits-classifier", "snapshot_id": "snap-1"}

    async with harness.client(app) as client:
        anonymous = await client.get("/v1/runs")
        read = await client.get("/v1/runs", headers={"Authorization": f"Bearer {viewer}"})
        forbidden = await client.post(
            "/v1/runs", json=body, headers={"Authorization": f"Bearer {viewer}"}
        )
        accepted = await client.post(
            "/v1/runs", json=body, headers={"Authorization": f"Bearer {operator}"}
        )
    await verifier.aclose()

    assert anonymous.status_code == 401
    assert read.status_code == 200
    assert forbidden.status_code == 403
    assert accepted.status_code == 202
    assert accepted.json()["requested_by"] == "op-1"


# --- the kubernetes backend behind the same use cases -------------------------------------------


@dataclass
class MlflowStub:
    """Where the kubernetes backend reads results: the versions runs registered."""

    outputs: dict[uuid.UUID, TrainingOutput] = field(default_factory=dict)

    async def result(self, run_id: uuid.UUID) -> TrainingOutput | None:
        return self.outputs.get(run_id)

    def close(self) -> None:
        self.outputs.clear()


async def test_kubernetes_runs_end_in_model_trained_or_training_failed(
    kube_api: KubeApiServer,
) -> None:
    mlflow = MlflowStub()
    settings = KubernetesSettings.model_validate(
        {"connection": {"host": kube_api.url}, "queue_name": None, "namespace": "ml"}
    )
    backend = KubernetesBackend(
        settings, TrainingOptions(), PlatformSettings(), mlflow, timeout_s=600
    )
    store = FakeStore()
    dispatch = TrainerDispatch(
        store,
        backend,
        Scheduler(2),
        owner=OWNER,
        registered_model=lambda _project, line: line,
        timeout_s=600,
        lost_after_s=60,
        clock=Clock(),
    )
    good, bad = threshold_event("line-a"), threshold_event("line-b")
    await dispatch.threshold_reached(good)
    await dispatch.threshold_reached(bad)

    await dispatch.tick()
    runs = {run.trigger_event_id: run for run in store.runs_.values()}
    good_run, bad_run = runs[good.event_id], runs[bad.event_id]
    jobs = {j["metadata"]["name"]: j for j in kube_api.objects("/apis/batch/v1/namespaces/ml/jobs")}
    assert set(jobs) == {f"flywheel-train-{good_run.run_id}", f"flywheel-train-{bad_run.run_id}"}
    assert good_run.state is RunState.RUNNING
    assert good_run.backend == "kubernetes"
    mlflow.outputs[good_run.run_id] = TrainingOutput(
        run_id="mlflow-7", model_name="line-a", version="7", metrics={"val_accuracy": 0.9}
    )
    kube_api.set_status(
        f"/apis/batch/v1/namespaces/ml/jobs/flywheel-train-{good_run.run_id}",
        {"conditions": [{"type": "Complete", "status": "True"}]},
    )
    pod = f"flywheel-train-{bad_run.run_id}-x1"
    kube_api.put(
        "/api/v1/namespaces/ml/pods",
        {
            "metadata": {"name": pod, "labels": {"flywheel.dev/run-id": str(bad_run.run_id)}},
            "status": {
                "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 1}}}]
            },
        },
    )
    kube_api.set_log("ml", pod, "Traceback\nKeyError: 'label'\n")
    kube_api.set_status(
        f"/apis/batch/v1/namespaces/ml/jobs/flywheel-train-{bad_run.run_id}",
        {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]},
    )
    await dispatch.tick()

    [trained] = store.events(ModelTrainedV1)
    assert trained.payload.training_run_id == good_run.run_id
    assert (trained.payload.backend, trained.payload.model_version) == ("kubernetes", "7")
    assert trained.correlation_id == good.correlation_id
    [failed] = store.events(TrainingFailedV1)
    assert failed.payload.training_run_id == bad_run.run_id
    assert (failed.payload.reason, failed.payload.retryable) == (
        "training exited with code 1",
        False,
    )
    ended = store.runs_[bad_run.run_id]
    assert ended.exit_code == 1
    assert ended.log_tail.endswith("KeyError: 'label'")
    transport = httpx.ASGITransport(app=api_app(dispatch))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        detail = (await client.get(f"/v1/runs/{good_run.run_id}")).json()
    assert detail["placement"]["decision"]["cluster"] == "default"
    assert detail["placement"]["inputs"]["priority"] == "threshold"


async def test_an_operator_run_carries_its_own_entry_point_to_the_backend(
    harness: Harness,
) -> None:
    body = {
        "project_id": "digits",
        "model_line": "digits-classifier",
        "snapshot_id": "snap-9",
        "entry_point": "examples/train.py",
        "hyperparameters": {"epochs": 1, "layers": [8, 8]},
        "nproc_per_node": 2,
    }

    async with harness.client() as client:
        queued = await client.post("/v1/runs", json=body)
        bad = await client.post("/v1/runs", json=body | {"entry_point": " "})
        await harness.dispatch.tick()
        shown = (await client.get(f"/v1/runs/{queued.json()['run_id']}")).json()

    assert queued.status_code == 202, queued.text
    assert bad.status_code == 422
    [spec] = harness.backend.launched
    assert (spec.entry_point, spec.hyperparameters, spec.nproc_per_node) == (
        "examples/train.py",
        {"epochs": 1, "layers": [8, 8]},
        2,
    )
    assert (shown["entry_point"], shown["nproc_per_node"]) == ("examples/train.py", 2)
    assert shown["hyperparameters"] == {"epochs": 1, "layers": [8, 8]}
