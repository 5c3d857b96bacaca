"""In-memory fakes of the rollout's ports and event builders, for unit and component tests."""

import copy
import hashlib
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from flywheel_clients.registry import ModelVersionInfo
from flywheel_contracts import (
    Event,
    InferenceLoggedV1,
    LabelsSavedV1,
    ModelTrainedV1,
    ModelValidatedV1,
    ThresholdReachedV1,
)
from flywheel_rollout.analysis import Window
from flywheel_rollout.policy import CanaryPolicy, Margins
from flywheel_rollout.ports import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    Canary,
    CanaryFilter,
    CanaryState,
    Check,
    LineControl,
    TimelineEntry,
)
from flywheel_rollout.service import Rollout
from flywheel_runtime.errors import DependencyUnavailableError, FlywheelError

START = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
PROJECT = "digits"
LINE = "digits-classifier"
MODEL = "digits-classifier"

POLICY = CanaryPolicy(
    steps=[10, 50],
    interval_s=10,
    bake_s=0,
    min_requests=20,
    threshold=2,
    min_feedback=5,
    min_pairs=5,
    margins=Margins(error_rate=0.02, latency_p95=0.5, latency_p99=1.0, latency_slack_ms=2),
)


class Clock:
    """A clock tests move by hand."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class State:
    canaries: dict[uuid.UUID, Canary] = field(default_factory=dict)
    windows: dict[tuple[uuid.UUID, int, str], Window] = field(default_factory=dict)
    window_locks: list[str] = field(default_factory=list)
    """Versions whose windows were read for update, in order."""
    recent: dict[tuple[uuid.UUID, str, str], tuple[str, datetime]] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    timeline: list[TimelineEntry] = field(default_factory=list)
    controls: dict[str, LineControl] = field(default_factory=dict)
    project_lines: set[tuple[str, str]] = field(default_factory=set)
    claimed: set[uuid.UUID] = field(default_factory=set)
    log_claims: set[uuid.UUID] = field(default_factory=set)
    outbox: list[Event[Any]] = field(default_factory=list)


class UniqueViolationError(Exception):
    """What the database's one-active-canary-per-line index would raise."""


class FakeTransaction:
    """Works on a copy of the state; the store adopts it only when the block completes."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.locked_lines: list[str] = []

    async def claim(self, event_id: uuid.UUID) -> bool:
        if event_id in self.state.claimed:
            return False
        self.state.claimed.add(event_id)
        return True

    async def claim_log(self, event_id: uuid.UUID) -> bool:
        if event_id in self.state.log_claims:
            return False
        self.state.log_claims.add(event_id)
        return True

    async def emit(self, event: Event[Any]) -> None:
        self.state.outbox.append(event)

    async def lock_line(self, model_line: str) -> None:
        self.locked_lines.append(model_line)

    async def add_canary(self, canary: Canary) -> None:
        assert canary.rollout_id not in self.state.canaries
        self.state.canaries[canary.rollout_id] = canary.model_copy(deep=True)

    async def save_canary(self, canary: Canary) -> None:
        self.state.canaries[canary.rollout_id] = canary.model_copy(deep=True)

    async def lock_canary(self, rollout_id: uuid.UUID) -> Canary | None:
        found = self.state.canaries.get(rollout_id)
        return None if found is None else found.model_copy(deep=True)

    async def active_canary(self, model_line: str) -> Canary | None:
        found = [
            c for c in self.state.canaries.values() if c.model_line == model_line and c.state.active
        ]
        return found[0].model_copy(deep=True) if found else None

    async def waiting_canaries(self, model_line: str) -> list[Canary]:
        found = [
            c
            for c in self.state.canaries.values()
            if c.model_line == model_line and c.state is CanaryState.WAITING
        ]
        return [c.model_copy(deep=True) for c in sorted(found, key=lambda c: c.created_at)]

    async def canary_by_event(self, validated_event_id: uuid.UUID) -> Canary | None:
        found = [
            c for c in self.state.canaries.values() if c.validated_event_id == validated_event_id
        ]
        return found[0].model_copy(deep=True) if found else None

    async def open_interval(self, rollout_id: uuid.UUID) -> int | None:
        found = self.state.canaries.get(rollout_id)
        if found is None or found.state is not CanaryState.RUNNING:
            return None
        return found.interval_index

    async def window(self, rollout_id: uuid.UUID, interval: int, version: str) -> Window:
        self.state.window_locks.append(version)
        found = self.state.windows.get((rollout_id, interval, version))
        return Window() if found is None else found.model_copy(deep=True)

    async def save_window(
        self, rollout_id: uuid.UUID, interval: int, version: str, window: Window
    ) -> None:
        self.state.windows[(rollout_id, interval, version)] = window.model_copy(deep=True)

    async def windows(self, rollout_id: uuid.UUID, interval: int) -> dict[str, Window]:
        return {
            version: window.model_copy(deep=True)
            for (rid, index, version), window in self.state.windows.items()
            if rid == rollout_id and index == interval
        }

    async def feedback(self, rollout_id: uuid.UUID) -> dict[str, Window]:
        totals: dict[str, Window] = {}
        for (rid, _, version), window in self.state.windows.items():
            if rid == rollout_id:
                totals[version] = totals.get(version, Window()).merged(window)
        return totals

    async def recent_class(
        self, rollout_id: uuid.UUID, version: str, input_sha256: str
    ) -> str | None:
        found = self.state.recent.get((rollout_id, version, input_sha256))
        return None if found is None else found[0]

    async def remember(
        self,
        rollout_id: uuid.UUID,
        version: str,
        input_sha256: str,
        predicted_class: str,
        at: datetime,
    ) -> None:
        self.state.recent[(rollout_id, version, input_sha256)] = (predicted_class, at)

    async def forget(self, rollout_id: uuid.UUID) -> None:
        self.state.recent = {k: v for k, v in self.state.recent.items() if k[0] != rollout_id}

    async def add_check(self, check: Check) -> None:
        assert not any(
            c.rollout_id == check.rollout_id and c.interval_index == check.interval_index
            for c in self.state.checks
        )
        self.state.checks.append(check)

    async def record(self, entry: TimelineEntry) -> None:
        self.state.timeline.append(entry.model_copy(update={"entry_id": len(self.state.timeline)}))

    async def control(self, model_line: str) -> LineControl:
        found = self.state.controls.get(model_line)
        return LineControl(model_line=model_line) if found is None else found.model_copy()

    async def save_control(self, control: LineControl) -> None:
        self.state.controls[control.model_line] = control.model_copy()

    async def learn_line(self, project_id: str, model_line: str) -> None:
        if (project_id, model_line) in self.state.project_lines:
            return
        self.state.project_lines.add((project_id, model_line))
        self.state.timeline = [
            e.model_copy(update={"model_line": model_line})
            if e.model_line is None and e.project_id == project_id
            else e
            for e in self.state.timeline
        ]

    async def lines_of(self, project_id: str) -> list[str]:
        return sorted(line for project, line in self.state.project_lines if project == project_id)

    async def project_canaries(self, project_id: str) -> list[Canary]:
        return [
            c.model_copy(deep=True)
            for c in self.state.canaries.values()
            if c.project_id == project_id and c.state in (CanaryState.RUNNING, CanaryState.PAUSED)
        ]


@dataclass
class FakeStore:
    state: State = field(default_factory=State)
    pruned: list[tuple[int, datetime]] = field(default_factory=list)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[FakeTransaction]:
        tx = FakeTransaction(copy.deepcopy(self.state))
        yield tx
        lines = [c.model_line for c in tx.state.canaries.values() if c.state in ACTIVE_STATES]
        if len(lines) != len(set(lines)):
            raise UniqueViolationError("two canaries in progress on one line")
        self.state = tx.state

    async def canary(self, rollout_id: uuid.UUID) -> Canary | None:
        found = self.state.canaries.get(rollout_id)
        return None if found is None else found.model_copy(deep=True)

    async def current(self, model_line: str) -> Canary | None:
        return await FakeTransaction(self.state).active_canary(model_line)

    async def canaries(self, where: CanaryFilter) -> list[Canary]:
        found = [
            c
            for c in self.state.canaries.values()
            if (where.model_line is None or c.model_line == where.model_line)
            and (not where.states or c.state in where.states)
        ]
        found.sort(key=lambda c: c.created_at, reverse=True)
        return [c.model_copy(deep=True) for c in found[: where.limit]]

    async def checks(self, rollout_id: uuid.UUID) -> list[Check]:
        return sorted(
            (c for c in self.state.checks if c.rollout_id == rollout_id),
            key=lambda c: c.interval_index,
        )

    async def timeline(
        self, model_line: str, correlation_id: uuid.UUID | None, limit: int
    ) -> list[TimelineEntry]:
        found = [
            e
            for e in self.state.timeline
            if e.model_line == model_line
            and (correlation_id is None or e.correlation_id == correlation_id)
        ]
        found.sort(key=lambda e: (e.at, e.entry_id or 0))
        return found[-limit:]

    async def line_control(self, model_line: str) -> LineControl:
        return await FakeTransaction(self.state).control(model_line)

    async def frozen_lines(self) -> set[str]:
        return {line for line, control in self.state.controls.items() if control.frozen}

    async def unfinalized(self) -> list[Canary]:
        return [
            c.model_copy(deep=True)
            for c in self.state.canaries.values()
            if c.state in TERMINAL_STATES and c.finalized_at is None
        ]

    async def latest_steps(self) -> list[Canary]:
        latest: dict[str, Canary] = {}
        for canary in self.state.canaries.values():
            if canary.last_step is None:
                continue
            known = latest.get(canary.model_line)
            if known is None or (canary.started_at or START) > (known.started_at or START):
                latest[canary.model_line] = canary
        return [c.model_copy(deep=True) for c in latest.values()]

    async def prune(self, *, keep_recent: int, log_claims_before: datetime) -> None:
        self.pruned.append((keep_recent, log_claims_before))

    # --- test helpers -----------------------------------------------------------------------

    def events(self, kind: type[Event[Any]]) -> list[Any]:
        return [e for e in self.state.outbox if isinstance(e, kind)]

    def only(self, version: str) -> Canary:
        [found] = [c for c in self.state.canaries.values() if c.candidate_version == version]
        return found


@dataclass
class FakeRegistry:
    aliases: dict[str, str] = field(default_factory=dict)
    tags: dict[str, dict[str, str]] = field(default_factory=dict)
    down: bool = False
    calls: list[str] = field(default_factory=list)

    def _check(self, name: str) -> None:
        assert name == MODEL
        if self.down:
            raise DependencyUnavailableError("model registry is unavailable")

    async def get_alias(self, name: str, alias: str) -> ModelVersionInfo | None:
        self._check(name)
        version = self.aliases.get(alias)
        return None if version is None else ModelVersionInfo(name=name, version=version)

    async def set_alias(self, name: str, alias: str, version: str) -> None:
        self._check(name)
        self.calls.append(f"set {alias}={version}")
        self.aliases[alias] = version

    async def delete_alias(self, name: str, alias: str) -> None:
        self._check(name)
        self.calls.append(f"delete {alias}")
        self.aliases.pop(alias, None)

    async def set_tags(self, name: str, version: str, tags: Mapping[str, str]) -> None:
        self._check(name)
        self.tags.setdefault(version, {}).update(tags)


@dataclass
class FakeServing:
    """Which versions of the model are loaded; a version may refuse to load."""

    loaded: list[str] = field(default_factory=list)
    history: list[list[str]] = field(default_factory=list)
    broken: dict[str, FlywheelError] = field(default_factory=dict)
    down: bool = False

    async def serve(self, registered_model: str, versions: Sequence[str]) -> None:
        assert registered_model == MODEL
        if self.down:
            raise DependencyUnavailableError("Triton is unavailable")
        for version in versions:
            if version in self.broken:
                raise self.broken[version]
        self.loaded = list(versions)
        self.history.append(list(versions))

    async def ready(self, registered_model: str, version: str) -> bool:
        assert registered_model == MODEL
        if self.down:
            raise DependencyUnavailableError("Triton is unavailable")
        return version in self.loaded


@dataclass
class FakeBus:
    published: list[Event[Any]] = field(default_factory=list)

    async def publish(self, event: Event[Any]) -> None:
        self.published.append(event)


@dataclass
class Harness:
    rollout: Rollout
    store: FakeStore
    registry: FakeRegistry
    serving: FakeServing
    bus: FakeBus
    clock: Clock

    async def settle(self) -> None:
        """Ticks until nothing is left to do at this moment."""
        for _ in range(10):
            before = copy.deepcopy(self.store.state)
            await self.rollout.tick()
            if self.store.state == before:
                return

    async def later(self, seconds: float) -> None:
        self.clock.advance(seconds)
        await self.settle()

    async def serve(self, version: str, n: int, **kwargs: Any) -> None:
        for index in range(n):
            await self.rollout.inference_logged(logged(version, index=index, **kwargs))


def harness(policy: CanaryPolicy = POLICY, **overrides: Any) -> Harness:
    clock = Clock()
    store, registry, serving, bus = FakeStore(), FakeRegistry(), FakeServing(), FakeBus()
    options: dict[str, Any] = {
        "default_policy": policy,
        "drain_s": 5.0,
        "outage_error_codes": ("dependency_unavailable",),
        "live_cache_s": 0.0,
        "clock": clock,
    } | overrides
    rollout = Rollout(store, registry, serving, bus, **options)
    return Harness(rollout, store, registry, serving, bus, clock)


# --- events -----------------------------------------------------------------------------------


def validated(
    version: str,
    *,
    champion: str | None = None,
    verdict: str = "passed",
    project: str = PROJECT,
    line: str = LINE,
    correlation_id: uuid.UUID | None = None,
) -> ModelValidatedV1:
    return ModelValidatedV1.model_validate(
        {
            "correlation_id": correlation_id or uuid.uuid4(),
            "payload": {
                "project_id": project,
                "model_line": line,
                "registered_model": MODEL,
                "model_version": version,
                "champion_version": champion,
                "snapshot_id": "snap-1",
                "verdict": verdict,
                "reasons": ["accuracy 0.98 >= champion 0.97 - 0.005: pass"],
            },
        }
    )


def sha(index: int) -> str:
    return hashlib.sha256(str(index).encode()).hexdigest()


def logged(
    version: str,
    *,
    index: int = 0,
    ok: bool = True,
    latency_ms: float = 10.0,
    predicted_class: str | None = "7",
    error_code: str | None = None,
    serving_unavailable: bool = False,
    line: str = LINE,
) -> InferenceLoggedV1:
    return InferenceLoggedV1.model_validate(
        {
            "payload": {
                "request_id": uuid.uuid4(),
                "project_id": PROJECT,
                "model_line": line,
                "registered_model": MODEL,
                "model_version": version,
                "input_sha256": sha(index),
                "predicted_class": predicted_class if ok else None,
                "latency_ms": latency_ms,
                "status": "ok" if ok else "error",
                "error_code": None if ok else error_code or "model_error",
                "served_at": START,
                "serving_unavailable": serving_unavailable,
            }
        }
    )


def labels(
    feedback: Sequence[tuple[str, bool]] = (),
    *,
    project: str = PROJECT,
    correlation_id: uuid.UUID | None = None,
) -> LabelsSavedV1:
    return LabelsSavedV1.model_validate(
        {
            "correlation_id": correlation_id or uuid.uuid4(),
            "payload": {
                "project_id": project,
                "batch_id": uuid.uuid4(),
                "snapshot_id": "snap-1",
                "label_ids": [uuid.uuid4() for _ in range(max(1, len(feedback)))],
                "prefilled_count": len(feedback),
                "corrected_count": sum(corrected for _, corrected in feedback),
                "feedback": [
                    {
                        "prediction_id": uuid.uuid4().hex,
                        "model_version": version,
                        "predicted_class": "7",
                        "class_name": "1" if corrected else "7",
                        "corrected": corrected,
                    }
                    for version, corrected in feedback
                ],
            },
        }
    )


def threshold(correlation_id: uuid.UUID, *, line: str = LINE) -> ThresholdReachedV1:
    return ThresholdReachedV1.model_validate(
        {
            "correlation_id": correlation_id,
            "payload": {
                "project_id": PROJECT,
                "model_line": line,
                "snapshot_id": "snap-1",
                "reason": "count",
                "decision_id": uuid.uuid4(),
                "labels_since_last": 100,
                "threshold": 100,
            },
        }
    )


def trained(version: str, correlation_id: uuid.UUID, *, line: str = LINE) -> ModelTrainedV1:
    return ModelTrainedV1.model_validate(
        {
            "correlation_id": correlation_id,
            "payload": {
                "project_id": PROJECT,
                "model_line": line,
                "snapshot_id": "snap-1",
                "training_run_id": uuid.uuid4(),
                "mlflow_run_id": uuid.uuid4().hex,
                "registered_model": MODEL,
                "model_version": version,
                "backend": "local",
            },
        }
    )
