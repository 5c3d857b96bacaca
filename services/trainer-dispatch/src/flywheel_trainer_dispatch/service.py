"""The trainer dispatch's use cases: plain async methods over the ports.

A trigger (threshold.reached, or an operator's request) becomes a queued run in one transaction
with the event's claim, so a redelivered event never queues a second run. Runs start in
``tick``: one scheduling transaction chooses what may start (``Scheduler``) and marks it
``starting`` under the database's locks, then the backend launches it and the run becomes
``running`` with the backend's handle. Each ``tick`` also checks every run this instance
watches (finished, failed, timed out, cancel requested) and closes it in a transaction that
queues model.trained or training.failed in the outbox. After a restart, ``recover`` finds the
runs this instance had in progress and re-attaches, completes or fails each one.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from pydantic import JsonValue

from flywheel_contracts import (
    Event,
    ModelTrainedPayload,
    ModelTrainedV1,
    ThresholdReachedV1,
    TrainingFailedPayload,
    TrainingFailedV1,
)
from flywheel_trainer_dispatch.errors import LaunchError, RunFinishedError, RunNotFoundError
from flywheel_trainer_dispatch.outcomes import (
    CANCELLED,
    CANCELLED_WHILE_QUEUED,
    Failure,
    Recovery,
    exit_failure,
    lost_failure,
    recovery_for,
    silent_owner_failure,
    timeout_failure,
)
from flywheel_trainer_dispatch.ports import (
    Phase,
    RunFilter,
    RunHandle,
    RunSpec,
    RunState,
    RunStatus,
    RunStore,
    TrainingBackend,
    TrainingOutput,
    TrainingRun,
    Transaction,
)
from flywheel_trainer_dispatch.scheduler import Priority, Scheduler, priority_of

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]
ModelNamer = Callable[[str, str], str]
"""``(project_id, model_line) -> registered model name``."""


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class RunRequest:
    """An operator's request for a run (manual or scheduled)."""

    project_id: str
    model_line: str
    snapshot_id: str
    priority: Priority
    excluded_label_ids: tuple[uuid.UUID, ...] = ()
    requested_by: str | None = None
    request_id: uuid.UUID | None = None
    """Idempotency key: the same id asks for the same run."""
    entry_point: str | None = None
    """The entry point to run instead of the model line's."""
    hyperparameters: Mapping[str, JsonValue] = field(default_factory=dict)
    """Hyperparameters over the model line's."""
    nproc_per_node: int | None = None
    """Processes per node instead of the model line's."""


@dataclass(frozen=True)
class RunLog:
    text: str
    complete: bool
    """False when only the stored tail was available (the run's log is on another instance)."""


class TrainerDispatch:
    """Queues training runs per model line, starts them on a backend and reports how they end."""

    def __init__(
        self,
        store: RunStore,
        backend: TrainingBackend,
        scheduler: Scheduler,
        *,
        owner: str,
        registered_model: ModelNamer,
        timeout_s: float,
        lost_after_s: float,
        clock: Clock = utcnow,
    ) -> None:
        self._store = store
        self._backend = backend
        self._scheduler = scheduler
        self._owner = owner
        self._registered_model = registered_model
        self._timeout = timedelta(seconds=timeout_s)
        self._lost_after = timedelta(seconds=lost_after_s)
        self._clock = clock
        self._tails: dict[uuid.UUID, str] = {}
        self.changed = asyncio.Event()
        """Set when a run was queued or asked to stop: the supervisor ticks now, not later."""

    @property
    def owner(self) -> str:
        return self._owner

    # --- triggers -------------------------------------------------------------------------

    async def threshold_reached(self, event: ThresholdReachedV1) -> TrainingRun | None:
        """Reacts to threshold.reached: queues a run for the model line (once per event).

        Replaces the line's queued run, if any; emits nothing until the run ends.
        """
        reached = event.payload
        run = TrainingRun(
            run_id=_run_id(event.event_id),
            trigger_event_id=event.event_id,
            correlation_id=event.correlation_id,
            causation_id=event.event_id,
            source="threshold.reached",
            project_id=reached.project_id,
            model_line=reached.model_line,
            snapshot_id=reached.snapshot_id,
            registered_model=self._registered_model(reached.project_id, reached.model_line),
            reason=reached.reason.value,
            decision_id=reached.decision_id,
            excluded_label_ids=sorted(set(reached.excluded_label_ids)),
            priority=priority_of(reached.reason),
            backend=self._backend.name,
        )
        async with self._store.transaction() as tx:
            if not await tx.claim(event.event_id):
                log.info("threshold.reached already handled", run_id=str(run.run_id))
                return None
            queued = await self._admit(tx, run)
        self.changed.set()
        return queued

    async def request_run(self, request: RunRequest) -> TrainingRun:
        """An operator asks for a run: queued like a trigger; the same request id, same run."""
        trigger = request.request_id or uuid.uuid4()
        run = TrainingRun(
            run_id=_run_id(trigger),
            trigger_event_id=trigger,
            correlation_id=uuid.uuid4(),
            source="api",
            project_id=request.project_id,
            model_line=request.model_line,
            snapshot_id=request.snapshot_id,
            registered_model=self._registered_model(request.project_id, request.model_line),
            reason=request.priority.value,
            excluded_label_ids=sorted(set(request.excluded_label_ids)),
            requested_by=request.requested_by,
            priority=request.priority,
            backend=self._backend.name,
            entry_point=request.entry_point,
            hyperparameters=dict(request.hyperparameters),
            nproc_per_node=request.nproc_per_node,
        )
        async with self._store.transaction() as tx:
            existing = await tx.run_by_trigger(trigger)
            if existing is not None:
                return existing
            queued = await self._admit(tx, run)
        self.changed.set()
        return queued

    async def cancel(self, run_id: uuid.UUID) -> TrainingRun:
        """An operator cancels a run: a queued one at once (emits training.failed), a running
        one through the instance watching it, which stops its processes first."""
        async with self._store.transaction() as tx:
            run = await tx.lock_run(run_id)
            if run is None:
                raise RunNotFoundError(
                    f"run {run_id} does not exist", details={"run_id": str(run_id)}
                )
            if run.state.terminal:
                raise RunFinishedError(
                    f"run {run_id} has already ended ({run.state})",
                    details={"run_id": str(run_id), "state": run.state.value},
                )
            if run.state is RunState.QUEUED:
                await self._close(tx, run, RunState.CANCELLED, failure=CANCELLED_WHILE_QUEUED)
            elif run.cancel_requested_at is None:
                run.cancel_requested_at = self._clock()
                await tx.save_run(run)
        self.changed.set()
        log.info("run cancel requested", run_id=str(run_id), state=run.state.value)
        return run

    # --- read API -------------------------------------------------------------------------

    async def run(self, run_id: uuid.UUID) -> TrainingRun:
        run = await self._store.run(run_id)
        if run is None:
            raise RunNotFoundError(f"run {run_id} does not exist", details={"run_id": str(run_id)})
        return run

    async def runs(self, where: RunFilter) -> list[TrainingRun]:
        return await self._store.runs(where)

    async def log(self, run_id: uuid.UUID) -> RunLog:
        """The run's whole log when this instance holds it, else the tail kept in its record."""
        run = await self.run(run_id)
        if run.handle is not None:
            text = await self._backend.read_log(RunHandle.model_validate(run.handle))
            if text is not None:
                return RunLog(text, complete=True)
        return RunLog(run.log_tail, complete=False)

    # --- background -----------------------------------------------------------------------

    async def recover(self) -> None:
        """At startup: settle every run this instance had in progress before it stopped."""
        for run in await self._store.active_runs(self._owner):
            await self._settle(run)
        self.changed.set()

    async def _settle(self, run: TrainingRun) -> None:
        """Re-attach, complete, fail or requeue a run whose launch nobody is watching."""
        status = await self._backend.recover(_handle_of(run))
        action = recovery_for(run.state, status.phase)
        log.info("run recovered", run_id=str(run.run_id), action=action.value)
        if action is Recovery.REATTACH:
            await self._reattach(run, status)
        elif action is Recovery.SUCCEED:
            await self._finish(run, status)
        elif action is Recovery.REQUEUE:
            await self._requeue(run)
        else:
            await self._fail(run, lost_failure(status.exit_code), status)

    async def tick(self) -> None:
        """Checks the runs this instance watches, fails runs of silent instances, then starts
        what may start."""
        now = self._clock()
        active = await self._store.active_runs(self._owner)
        for run in active:
            await self._watch(run, now)
        if active:
            async with self._store.transaction() as tx:
                await tx.heartbeat(self._owner, now)
        await self._sweep(now)
        await self._schedule()

    async def _watch(self, run: TrainingRun, now: datetime) -> None:
        if run.state is RunState.STARTING:
            # Launches finish within a tick, so this one's launch broke half-way (the database
            # went away after the process started, say): settle it as after a restart.
            await self._settle(run)
            return
        handle = _handle_of(run)
        if run.cancel_requested_at is not None:
            await self._stop(run, handle, CANCELLED, RunState.CANCELLED)
            return
        if run.started_at is not None and now - run.started_at > self._timeout:
            log.warning("run timed out", run_id=str(run.run_id))
            failure = timeout_failure(self._timeout.total_seconds())
            await self._stop(run, handle, failure, RunState.FAILED)
            return
        status = await self._backend.poll(handle)
        if status.phase is Phase.RUNNING:
            if self._tails.get(run.run_id) != status.log_tail:
                await self._update_tail(run.run_id, status.log_tail)
        elif status.phase is Phase.SUCCEEDED:
            await self._finish(run, status)
        else:
            await self._fail(run, exit_failure(status.exit_code), status)

    async def _stop(
        self, run: TrainingRun, handle: RunHandle, failure: Failure, state: RunState
    ) -> None:
        """Stop a run's processes and close it, unless it registered its version first."""
        await self._backend.cancel(handle)
        status = await self._backend.poll(handle)
        if status.phase is Phase.SUCCEEDED:
            # It finished just before it was stopped: its version exists, so announce it.
            await self._finish(run, status)
        else:
            await self._fail(run, failure, status, state=state)

    async def _sweep(self, now: datetime) -> None:
        """Fails runs whose instance stopped reporting (its machine is gone, say)."""
        for stale in await self._store.stale_runs(self._owner, now - self._lost_after):
            async with self._store.transaction() as tx:
                run = await tx.lock_run(stale.run_id)
                if run is None or not run.state.active or run.owner != stale.owner:
                    continue
                seen = run.heartbeat_at or run.started_at or run.created_at or now
                failure = silent_owner_failure(run.owner, (now - seen).total_seconds())
                await self._close(tx, run, RunState.FAILED, failure=failure)

    async def _schedule(self) -> None:
        """Starts the queued runs that may start, most urgent first."""
        # A run that cannot launch frees its slot at once: choose again until all launched.
        while await self._schedule_once():
            pass

    async def _schedule_once(self) -> bool:
        """One scheduling pass; True when a chosen run failed to launch."""
        async with self._store.transaction() as tx:
            if not await tx.try_lock_scheduler():
                return False  # another instance is scheduling; the next tick looks again
            waiting = {run.run_id: run for run in await tx.waiting_runs()}
            chosen = self._scheduler.pick(
                [run.waiting() for run in waiting.values()], await tx.active_lines()
            )
            starting = []
            for pick in chosen:
                run = waiting[pick.run_id]
                run.state = RunState.STARTING
                run.owner = self._owner
                await tx.save_run(run)
                starting.append(run)
        launched = [await self._launch(run) for run in starting]
        return not all(launched)

    async def _launch(self, run: TrainingRun) -> bool:
        spec = RunSpec(
            run_id=run.run_id,
            project_id=run.project_id,
            model_line=run.model_line,
            snapshot_id=run.snapshot_id,
            registered_model=run.registered_model,
            correlation_id=run.correlation_id,
            excluded_label_ids=tuple(run.excluded_label_ids),
            priority=run.priority,
            entry_point=run.entry_point,
            hyperparameters=run.hyperparameters,
            nproc_per_node=run.nproc_per_node,
        )
        try:
            handle = await self._backend.launch(spec)
        except LaunchError as error:
            log.error("run could not start", run_id=str(run.run_id), error=error.message)
            await self._fail(run, Failure(error.message, retryable=False), None)
            return False
        async with self._store.transaction() as tx:
            current = await tx.lock_run(run.run_id)
            if current is None:
                return True
            current.state = RunState.RUNNING
            current.handle = handle.model_dump(mode="json")
            current.command = handle.command
            current.started_at = current.heartbeat_at = self._clock()
            await tx.save_run(current)
        log.info(
            "run started",
            run_id=str(run.run_id),
            model_line=run.model_line,
            priority=run.priority.value,
            correlation_id=str(run.correlation_id),
        )
        return True

    # --- steps ----------------------------------------------------------------------------

    async def _admit(self, tx: Transaction, run: TrainingRun) -> TrainingRun:
        """Queue a run, replacing the line's queued one (the scheduler decides how)."""
        await tx.lock_line(run.model_line)
        queued = await tx.waiting_run(run.model_line)
        admission = self._scheduler.admit(
            queued.waiting() if queued is not None else None, run.priority
        )
        if queued is not None:
            queued.state = RunState.SUPERSEDED
            queued.superseded_by = run.run_id
            queued.finished_at = self._clock()
            await tx.save_run(queued)
            log.info(
                "queued run superseded",
                run_id=str(queued.run_id),
                superseded_by=str(run.run_id),
                model_line=run.model_line,
            )
        run.priority = admission.priority
        run.queue_position = admission.position
        added = await tx.add_run(run)
        log.info(
            "run queued",
            run_id=str(added.run_id),
            model_line=added.model_line,
            priority=added.priority.value,
            source=added.source,
        )
        return added

    async def _update_tail(self, run_id: uuid.UUID, tail: str) -> None:
        async with self._store.transaction() as tx:
            run = await tx.lock_run(run_id)
            if run is None or not run.state.active:
                return
            run.log_tail = tail
            await tx.save_run(run)
        self._tails[run_id] = tail

    async def _reattach(self, run: TrainingRun, status: RunStatus) -> None:
        async with self._store.transaction() as tx:
            current = await tx.lock_run(run.run_id)
            if current is None or not current.state.active:
                return
            handle = status.handle or _handle_of(current)
            current.state = RunState.RUNNING
            current.handle = handle.model_dump(mode="json")
            current.command = current.command or handle.command
            current.started_at = current.started_at or self._clock()
            current.heartbeat_at = self._clock()
            current.log_tail = status.log_tail or current.log_tail
            await tx.save_run(current)

    async def _requeue(self, run: TrainingRun) -> None:
        """A run chosen to start but never launched goes back to its place in the queue."""
        async with self._store.transaction() as tx:
            await tx.lock_line(run.model_line)
            current = await tx.lock_run(run.run_id)
            if current is None or current.state is not RunState.STARTING:
                return
            newer = await tx.waiting_run(run.model_line)
            if newer is not None:
                current.state = RunState.SUPERSEDED
                current.superseded_by = newer.run_id
                current.finished_at = self._clock()
            else:
                current.state = RunState.QUEUED
            current.owner = None
            await tx.save_run(current)

    async def _finish(self, run: TrainingRun, status: RunStatus) -> None:
        """Close a run that registered its model version; emits model.trained."""
        output = status.output
        if output is None:
            await self._fail(run, exit_failure(status.exit_code), status)
            return
        async with self._store.transaction() as tx:
            current = await tx.lock_run(run.run_id)
            if current is None or not current.state.active:
                return
            current.mlflow_run_id = output.run_id
            current.model_version = output.version
            current.base_model_version = output.base_version
            current.metrics = dict(output.metrics)
            current.exit_code = status.exit_code
            current.log_tail = status.log_tail or current.log_tail
            current.registered_model = output.model_name
            await self._close(tx, current, RunState.SUCCEEDED, output=output)
        log.info(
            "run succeeded",
            run_id=str(run.run_id),
            model=output.model_name,
            version=output.version,
            mlflow_run_id=output.run_id,
        )

    async def _fail(
        self,
        run: TrainingRun,
        failure: Failure,
        status: RunStatus | None,
        *,
        state: RunState = RunState.FAILED,
    ) -> None:
        async with self._store.transaction() as tx:
            current = await tx.lock_run(run.run_id)
            if current is None or current.state.terminal:
                return
            if status is not None:
                current.exit_code = status.exit_code
                current.log_tail = status.log_tail or current.log_tail
            await self._close(tx, current, state, failure=failure)
        log.warning(
            "run failed" if state is RunState.FAILED else f"run {state.value}",
            run_id=str(run.run_id),
            reason=failure.reason,
            retryable=failure.retryable,
        )

    async def _close(
        self,
        tx: Transaction,
        run: TrainingRun,
        state: RunState,
        *,
        failure: Failure | None = None,
        output: TrainingOutput | None = None,
    ) -> None:
        """End a run and queue the event that says so, in the caller's transaction."""
        run.state = state
        run.finished_at = self._clock()
        if failure is not None:
            run.failure_reason = failure.reason
            run.retryable = failure.retryable
        await tx.save_run(run)
        self._tails.pop(run.run_id, None)
        await tx.emit(_outcome(run, output))


def _run_id(trigger_id: uuid.UUID) -> uuid.UUID:
    """One run per trigger, with an id anyone can derive from the trigger's."""
    return uuid.uuid5(_RUN_NAMESPACE, str(trigger_id))


_RUN_NAMESPACE = uuid.UUID("6f3c1a52-7d7e-4c59-9a0e-2f1d3b7c9e11")


def _handle_of(run: TrainingRun) -> RunHandle:
    if run.handle is not None:
        return RunHandle.model_validate(run.handle)
    return RunHandle(backend=run.backend, run_id=run.run_id, command=run.command or [])


def _outcome(run: TrainingRun, output: TrainingOutput | None) -> Event[Any]:
    """model.trained or training.failed for a closed run, in the chain of its trigger."""
    envelope = {"correlation_id": run.correlation_id, "causation_id": run.causation_id}
    if output is not None:
        return ModelTrainedV1.model_validate(
            envelope
            | {
                "payload": ModelTrainedPayload(
                    project_id=run.project_id,
                    model_line=run.model_line,
                    snapshot_id=run.snapshot_id,
                    training_run_id=run.run_id,
                    mlflow_run_id=output.run_id,
                    registered_model=output.model_name,
                    model_version=output.version,
                    base_model_version=output.base_version,
                    backend=run.backend,
                    metrics=dict(output.metrics),
                    excluded_label_ids=list(run.excluded_label_ids),
                )
            }
        )
    return TrainingFailedV1.model_validate(
        envelope
        | {
            "payload": TrainingFailedPayload(
                project_id=run.project_id,
                model_line=run.model_line,
                snapshot_id=run.snapshot_id,
                training_run_id=run.run_id,
                mlflow_run_id=run.mlflow_run_id,
                backend=run.backend,
                reason=run.failure_reason or run.state.value,
                retryable=bool(run.retryable),
            )
        }
    )
