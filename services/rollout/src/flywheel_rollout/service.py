"""The rollout's use cases: plain async methods over the ports.

Every decision is one transaction on the canary's row (locked), with the events that announce
it queued in the outbox, so state and events commit together and a restart resumes from the
row. What happens outside the database follows from the committed state and is idempotent:

* a chosen canary (``starting``) gets the ``challenger`` alias and its candidate loaded next to
  the champion before the first step is committed;
* a promotion is decided first (``promoting``), then the registry moves ``champion`` and only
  then is the verdict committed, so whoever reads ``canary.verdict`` finds the alias moved;
* a rollback commits at once (weights back to the champion first), and the registry is tidied
  (``challenger`` removed, tags) right after;
* versions that lost their traffic are unloaded ``drain_s`` after the last weight change.

``tick`` drives all of it; handlers and operator actions only change rows and wake it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import structlog

from flywheel_clients.registry import CHALLENGER, CHAMPION
from flywheel_contracts import (
    CanaryOutcome,
    CanaryVerdictPayload,
    CanaryVerdictV1,
    Event,
    InferenceLoggedV1,
    LabelsSavedV1,
    ModelTrainedV1,
    ModelValidatedV1,
    RolloutStepPayload,
    RolloutStepV1,
    ThresholdReachedV1,
    TrainingFailedV1,
    ValidationVerdict,
)
from flywheel_rollout.analysis import Window, analyse
from flywheel_rollout.errors import CanaryNotFoundError, CanaryStateError
from flywheel_rollout.machine import Action, Progress, Transition, judge
from flywheel_rollout.policy import CanaryPolicy, policy_for
from flywheel_rollout.ports import (
    ACTIVE_STATES,
    Bus,
    Canary,
    CanaryFilter,
    CanaryState,
    Check,
    LineControl,
    Registry,
    Serving,
    Store,
    TimelineEntry,
    Transaction,
)
from flywheel_runtime.errors import DependencyUnavailableError, InvalidInputError, NotFoundError

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]

ACTOR: Final = "rollout"
"""Actor of the service's own moves on the timeline."""

TAG_PREFIX: Final = "canary."
"""Prefix of the version tags that record a canary's outcome."""

MAX_TAG_VALUE: Final = 5000
"""MLflow's limit on a tag value; longer reasons are cut."""

PRODUCERS: Final = {
    "labels.saved": "labeling",
    "threshold.reached": "data-monitor",
    "model.trained": "trainer-dispatch",
    "training.failed": "trainer-dispatch",
    "model.validated": "validator",
}
"""Who emits the events the timeline records, as their actor."""

_ROLLOUT_NAMESPACE = uuid.UUID("2b5d8f0e-6c41-4d7a-9a3e-51c0f7d2a6b4")
_PRUNE_EVERY_S = 60.0
_BAD_VERSION = (NotFoundError, InvalidInputError)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class LineStatus:
    """A model line as operators see it: its controls, its canary, and what waits."""

    control: LineControl
    current: Canary | None
    waiting: list[Canary]


@dataclass(frozen=True)
class _Live:
    """A running canary as inference logs need it."""

    rollout_id: uuid.UUID
    registered_model: str
    candidate: str
    champion: str | None

    def other(self, version: str) -> str | None:
        return self.champion if version == self.candidate else self.candidate


class Rollout:
    """Runs one canary per model line at a time and records everything on the line's timeline."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        serving: Serving,
        bus: Bus,
        *,
        default_policy: CanaryPolicy,
        project_policies: Mapping[str, CanaryPolicy] | None = None,
        champion_alias: str = CHAMPION,
        challenger_alias: str = CHALLENGER,
        drain_s: float = 10.0,
        recent_per_version: int = 10_000,
        outage_error_codes: Sequence[str] = ("dependency_unavailable",),
        log_claims_s: float = 3600.0,
        live_cache_s: float = 1.0,
        clock: Clock = utcnow,
    ) -> None:
        self._store = store
        self._registry = registry
        self._serving = serving
        self._bus = bus
        self._default_policy = default_policy
        self._project_policies = dict(project_policies or {})
        self._champion_alias = champion_alias
        self._challenger_alias = challenger_alias
        self._drain = timedelta(seconds=drain_s)
        self._recent_per_version = recent_per_version
        self._outage_codes = tuple(outage_error_codes)
        self._log_claims = timedelta(seconds=log_claims_s)
        self._live_cache_s = live_cache_s
        self._clock = clock
        self._live: dict[str, _Live] = {}
        self._live_loaded: float | None = None
        self._pruned: float | None = None
        self.changed = asyncio.Event()
        """Set when a canary or a line changed: the driver ticks now, not later."""

    def policy_for(self, project_id: str) -> CanaryPolicy:
        """The canary policy in force for a project: the default with its override applied."""
        return policy_for(project_id, self._default_policy, self._project_policies)

    # --- events ---------------------------------------------------------------------------

    async def model_validated(self, event: ModelValidatedV1) -> Canary | None:
        """Reacts to model.validated: a passed version gets a canary, waiting for its line (or
        refused while the line is frozen); a failed one is only recorded. Emits nothing itself:
        the canary's steps and verdict follow from ``tick``."""
        validated = event.payload
        now = self._clock()
        policy = self.policy_for(validated.project_id)
        against = validated.champion_version or "no champion"
        async with self._store.transaction() as tx:
            if not await tx.claim(event.event_id):
                log.info("model.validated already handled", event_id=str(event.event_id))
                return None
            await tx.learn_line(validated.project_id, validated.model_line)
            await tx.record(
                _heard(
                    event,
                    validated.model_line,
                    validated.project_id,
                    f"version {validated.model_version} {validated.verdict.value} validation "
                    f"against {against}",
                    {"model_version": validated.model_version, "reasons": validated.reasons},
                    now,
                )
            )
            if validated.verdict is not ValidationVerdict.PASSED:
                return None
            await tx.lock_line(validated.model_line)
            canary = Canary(
                rollout_id=uuid.uuid5(_ROLLOUT_NAMESPACE, str(event.event_id)),
                validated_event_id=event.event_id,
                correlation_id=event.correlation_id,
                project_id=validated.project_id,
                model_line=validated.model_line,
                registered_model=validated.registered_model,
                candidate_version=validated.model_version,
                state=CanaryState.WAITING,
                policy=policy,
                created_at=now,
            )
            control = await tx.control(validated.model_line)
            if control.frozen:
                reason = f"model line {validated.model_line} is frozen by {control.changed_by}" + (
                    f": {control.reason}" if control.reason else ""
                )
                self._end(canary, CanaryState.REFUSED, [reason], now)
                await tx.add_canary(canary)
                await tx.record(self._entry(canary, "canary.refused", reason, now))
            else:
                waiting = await tx.waiting_canaries(validated.model_line)
                if policy.waiting == "supersede":
                    for older in waiting:
                        reason = f"superseded by version {canary.candidate_version}"
                        self._end(older, CanaryState.SUPERSEDED, [reason], now)
                        await tx.save_canary(older)
                        await tx.record(self._entry(older, "canary.superseded", reason, now))
                    waiting = []
                ahead = ", ".join(c.candidate_version for c in waiting)
                await tx.add_canary(canary)
                await tx.record(
                    self._entry(
                        canary,
                        "canary.queued",
                        f"version {canary.candidate_version} waits for its canary"
                        + (f" behind version {ahead}" if ahead else ""),
                        now,
                        details={"policy": policy.model_dump(mode="json")},
                    )
                )
        self.changed.set()
        log.info(
            "canary recorded",
            rollout_id=str(canary.rollout_id),
            model_line=canary.model_line,
            version=canary.candidate_version,
            state=canary.state.value,
        )
        return canary

    async def inference_logged(self, event: InferenceLoggedV1) -> bool:
        """Reacts to inference.logged: counts the request in its version's window of the open
        interval while its line's canary runs (and notes agreement on inputs both versions
        answered). Emits nothing; True when the log counted."""
        logged = event.payload
        live = await self._live_canary(logged.model_line)
        version = logged.model_version
        if (
            live is None
            or live.registered_model != logged.registered_model
            or version not in (live.candidate, live.champion)
        ):
            return False
        now = self._clock()
        async with self._store.transaction() as tx:
            if not await tx.claim_log(event.event_id):
                return False
            interval = await tx.open_interval(live.rollout_id)
            if interval is None:
                return False
            window = await tx.window(live.rollout_id, interval, version)
            ok = logged.status == "ok"
            window.add_request(
                ok=ok,
                latency_ms=logged.latency_ms,
                error_code=logged.error_code,
                outage_codes=self._outage_codes,
                serving_unavailable=logged.serving_unavailable,
            )
            if ok and logged.predicted_class is not None:
                other = live.other(version)
                if other is not None:
                    seen = await tx.recent_class(live.rollout_id, other, logged.input_sha256)
                    if seen is not None:
                        window.add_pair(agree=seen == logged.predicted_class)
                await tx.remember(
                    live.rollout_id, version, logged.input_sha256, logged.predicted_class, now
                )
            await tx.save_window(live.rollout_id, interval, version, window)
        return True

    async def labels_saved(self, event: LabelsSavedV1) -> None:
        """Reacts to labels.saved: records the batch on its lines' timelines and counts the
        labelers' answers to pre-fills of versions in canary. Emits nothing."""
        saved = event.payload
        async with self._store.transaction() as tx:
            if not await tx.claim(event.event_id):
                return
            summary = (
                f"{len(saved.label_ids)} labels saved in snapshot {saved.snapshot_id} "
                f"({saved.corrected_count} of {saved.prefilled_count} pre-fills corrected)"
            )
            details = {
                "snapshot_id": saved.snapshot_id,
                "batch_id": str(saved.batch_id),
                "labels": len(saved.label_ids),
                "prefilled": saved.prefilled_count,
                "corrected": saved.corrected_count,
            }
            lines: list[str | None] = list(await tx.lines_of(saved.project_id)) or [None]
            now = self._clock()
            for line in lines:
                await tx.record(_heard(event, line, saved.project_id, summary, details, now))
            answered = [f for f in saved.feedback if f.model_version is not None]
            if not answered:
                return
            for canary in await tx.project_canaries(saved.project_id):
                versions = {canary.candidate_version, canary.champion_version}
                answers: dict[str, list[bool]] = {}
                for feedback in answered:
                    version = feedback.model_version
                    if version is not None and version in versions:
                        answers.setdefault(version, []).append(feedback.corrected)
                # Windows are locked in one order whatever the batch's order: two batches
                # answering both versions must not wait on each other (a deadlock).
                for version in sorted(answers):
                    window = await tx.window(canary.rollout_id, canary.interval_index, version)
                    for corrected in answers[version]:
                        window.add_feedback(corrected=corrected)
                    await tx.save_window(canary.rollout_id, canary.interval_index, version, window)

    async def threshold_reached(self, event: ThresholdReachedV1) -> None:
        """Reacts to threshold.reached: records the retrain trigger on the line's timeline."""
        reached = event.payload
        await self._hear(
            event,
            reached.project_id,
            reached.model_line,
            f"retrain triggered ({reached.reason.value}): {reached.labels_since_last} new labels, "
            f"threshold {reached.threshold}, snapshot {reached.snapshot_id}",
            {"snapshot_id": reached.snapshot_id, "decision_id": str(reached.decision_id)},
        )

    async def model_trained(self, event: ModelTrainedV1) -> None:
        """Reacts to model.trained: records the new version on the line's timeline."""
        trained = event.payload
        await self._hear(
            event,
            trained.project_id,
            trained.model_line,
            f"version {trained.model_version} trained on {trained.backend} "
            f"(run {trained.training_run_id})",
            {
                "model_version": trained.model_version,
                "training_run_id": str(trained.training_run_id),
                "mlflow_run_id": trained.mlflow_run_id,
                "metrics": trained.metrics,
            },
        )

    async def training_failed(self, event: TrainingFailedV1) -> None:
        """Reacts to training.failed: records the failure on the line's timeline."""
        failed = event.payload
        await self._hear(
            event,
            failed.project_id,
            failed.model_line,
            f"training run {failed.training_run_id} failed: {failed.reason}",
            {"training_run_id": str(failed.training_run_id), "retryable": failed.retryable},
        )

    async def _hear(
        self,
        event: Event[Any],
        project_id: str,
        model_line: str,
        summary: str,
        details: dict[str, Any],
    ) -> None:
        async with self._store.transaction() as tx:
            if not await tx.claim(event.event_id):
                return
            await tx.learn_line(project_id, model_line)
            await tx.record(_heard(event, model_line, project_id, summary, details, self._clock()))

    # --- operator actions -----------------------------------------------------------------

    async def promote(self, model_line: str, actor: str, reason: str | None = None) -> Canary:
        """An operator promotes the line's canary now; ``tick`` moves the alias, then emits
        rollout.step (100 %) and canary.verdict ``promoted``."""
        now = self._clock()
        async with self._store.transaction() as tx:
            canary = await self._active(tx, model_line)
            self._expect(canary, "promote", CanaryState.RUNNING, CanaryState.PAUSED)
            canary.state = CanaryState.PROMOTING
            canary.decided_by = actor
            canary.reasons = [_by("promoted", actor, reason)]
            await tx.save_canary(canary)
            await tx.record(
                self._entry(canary, "operator.promote", canary.reasons[0], now, actor=actor)
            )
        self._touched()
        return canary

    async def rollback(self, model_line: str, actor: str, reason: str | None = None) -> Canary:
        """An operator rolls the line's canary back now: emits rollout.step (0 %) and
        canary.verdict ``rolled_back`` at once."""
        now = self._clock()
        async with self._store.transaction() as tx:
            canary = await self._active(tx, model_line)
            self._expect(
                canary, "roll back", CanaryState.STARTING, CanaryState.RUNNING, CanaryState.PAUSED
            )
            text = _by("rolled back", actor, reason)
            await tx.record(self._entry(canary, "operator.rollback", text, now, actor=actor))
            await self._roll_back(tx, canary, [text], now, actor=actor)
            await tx.save_canary(canary)
        self._touched()
        return canary

    async def pause(self, model_line: str, actor: str, reason: str | None = None) -> Canary:
        """An operator holds the line's canary at its weights: no checks until resumed."""
        now = self._clock()
        async with self._store.transaction() as tx:
            canary = await self._active(tx, model_line)
            self._expect(canary, "pause", CanaryState.RUNNING)
            canary.state = CanaryState.PAUSED
            canary.decided_by = actor
            await tx.save_canary(canary)
            await tx.record(
                self._entry(
                    canary,
                    "operator.pause",
                    _by(f"paused at {canary.traffic_percent}%", actor, reason),
                    now,
                    actor=actor,
                )
            )
        self._touched()
        return canary

    async def resume(self, model_line: str, actor: str, reason: str | None = None) -> Canary:
        """An operator resumes a paused canary; analysis starts over with a fresh interval."""
        now = self._clock()
        async with self._store.transaction() as tx:
            canary = await self._active(tx, model_line)
            self._expect(canary, "resume", CanaryState.PAUSED)
            canary.state = CanaryState.RUNNING
            canary.decided_by = actor
            # What was served while paused was never meant to be judged.
            canary.interval_index += 1
            canary.interval_started_at = now
            await tx.save_canary(canary)
            await tx.record(
                self._entry(
                    canary,
                    "operator.resume",
                    _by(f"resumed at {canary.traffic_percent}%", actor, reason),
                    now,
                    actor=actor,
                )
            )
        self._touched()
        return canary

    async def freeze(self, model_line: str, actor: str, reason: str | None = None) -> LineControl:
        """An operator freezes a line: no canary starts on it, newly validated versions are
        refused; a canary already running goes on."""
        return await self._set_frozen(model_line, True, actor, reason)

    async def unfreeze(self, model_line: str, actor: str, reason: str | None = None) -> LineControl:
        """An operator unfreezes a line; versions that were waiting may start."""
        return await self._set_frozen(model_line, False, actor, reason)

    async def _set_frozen(
        self, model_line: str, frozen: bool, actor: str, reason: str | None
    ) -> LineControl:
        now = self._clock()
        async with self._store.transaction() as tx:
            await tx.lock_line(model_line)
            control = await tx.control(model_line)
            if control.frozen == frozen:
                return control
            control.frozen = frozen
            control.changed_by = actor
            control.changed_at = now
            control.reason = reason
            await tx.save_control(control)
            verb = "frozen" if frozen else "unfrozen"
            await tx.record(
                TimelineEntry(
                    model_line=model_line,
                    project_id=None,
                    kind=f"operator.{'freeze' if frozen else 'unfreeze'}",
                    actor=actor,
                    summary=_by(f"model line {verb}", actor, reason),
                    at=now,
                )
            )
        self._touched()
        return control

    async def _active(self, tx: Transaction, model_line: str) -> Canary:
        canary = await tx.active_canary(model_line)
        if canary is None:
            raise CanaryNotFoundError(
                f"model line {model_line} has no canary in progress",
                details={"model_line": model_line},
            )
        return canary

    @staticmethod
    def _expect(canary: Canary, action: str, *states: CanaryState) -> None:
        if canary.state not in states:
            raise CanaryStateError(
                f"cannot {action} a canary that is {canary.state.value}",
                details={"rollout_id": str(canary.rollout_id), "state": canary.state.value},
            )

    # --- read API -------------------------------------------------------------------------

    async def canary(self, rollout_id: uuid.UUID) -> Canary:
        found = await self._store.canary(rollout_id)
        if found is None:
            raise CanaryNotFoundError(
                f"canary {rollout_id} does not exist", details={"rollout_id": str(rollout_id)}
            )
        return found

    async def current(self, model_line: str) -> Canary:
        """The line's canary in progress; ``CanaryNotFoundError`` when there is none."""
        found = await self._store.current(model_line)
        if found is None:
            raise CanaryNotFoundError(
                f"model line {model_line} has no canary in progress",
                details={"model_line": model_line},
            )
        return found

    async def canaries(self, where: CanaryFilter) -> list[Canary]:
        return await self._store.canaries(where)

    async def checks(self, rollout_id: uuid.UUID) -> list[Check]:
        await self.canary(rollout_id)
        return await self._store.checks(rollout_id)

    async def timeline(
        self, model_line: str, correlation_id: uuid.UUID | None, limit: int
    ) -> list[TimelineEntry]:
        return await self._store.timeline(model_line, correlation_id, limit)

    async def line(self, model_line: str) -> LineStatus:
        waiting = await self._store.canaries(
            CanaryFilter(model_line=model_line, states=frozenset({CanaryState.WAITING}), limit=500)
        )
        return LineStatus(
            control=await self._store.line_control(model_line),
            current=await self._store.current(model_line),
            waiting=sorted(waiting, key=lambda c: c.created_at),
        )

    # --- background -----------------------------------------------------------------------

    async def recover(self) -> None:
        """At startup: make every line with a canary in progress serve what it needs (Triton
        may have restarted too)."""
        lines: dict[str, str] = {}
        for canary in await self._store.canaries(CanaryFilter(states=_IN_PROGRESS, limit=10_000)):
            lines[canary.model_line] = canary.registered_model
        for model_line, registered_model in sorted(lines.items()):
            await self._guard(self._reconcile(model_line, registered_model), model_line)
        self._touched()

    async def tick(self) -> None:
        """Moves every canary that is due: starts waiting ones on free lines, checks running
        ones, completes promotions and cleans up after ended ones."""
        await self._start_waiting()
        for state, step in (
            (CanaryState.STARTING, self._start),
            (CanaryState.RUNNING, self._check),
            (CanaryState.PROMOTING, self._promote),
        ):
            for canary in await self._store.canaries(
                CanaryFilter(states=frozenset({state}), limit=10_000)
            ):
                await self._guard(step(canary), canary.model_line)
        now = self._clock()
        for canary in await self._store.unfinalized():
            await self._guard(self._finalize(canary, now), canary.model_line)
        if self._pruned is None or time.monotonic() - self._pruned >= _PRUNE_EVERY_S:
            await self._store.prune(
                keep_recent=self._recent_per_version, log_claims_before=now - self._log_claims
            )
            self._pruned = time.monotonic()

    async def republish(self) -> int:
        """Publishes every line's current weights again, with their original time and sequence,
        so a BFF that restarted catches up; changes nothing. Returns how many."""
        published = 0
        for canary in await self._store.latest_steps():
            if canary.last_step is None:
                continue
            original = RolloutStepV1.model_validate(canary.last_step)
            again = original.model_copy(
                update={"event_id": uuid.uuid4(), "causation_id": original.event_id}
            )
            await self._bus.publish(again)
            published += 1
        return published

    async def _guard(self, work: Awaitable[object], model_line: str) -> None:
        """One line's trouble (an outage, say) must not hold up the others; the next tick
        tries again."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.warning(
                "canary work failed; retrying next tick", model_line=model_line, error=repr(error)
            )

    async def _start_waiting(self) -> None:
        """Chooses the oldest waiting canary of every free, unfrozen line."""
        frozen = await self._store.frozen_lines()
        waiting = await self._store.canaries(
            CanaryFilter(states=frozenset({CanaryState.WAITING}), limit=10_000)
        )
        for model_line in sorted({c.model_line for c in waiting} - frozen):
            async with self._store.transaction() as tx:
                await tx.lock_line(model_line)
                if (await tx.control(model_line)).frozen:
                    continue
                if await tx.active_canary(model_line) is not None:
                    continue
                queue = await tx.waiting_canaries(model_line)
                if not queue:
                    continue
                chosen = queue[0]
                chosen.state = CanaryState.STARTING
                await tx.save_canary(chosen)

    async def _start(self, canary: Canary) -> None:
        """Loads the chosen candidate beside the champion, then commits the first step (emits
        rollout.step); without a champion the candidate is promoted directly."""
        name = canary.registered_model
        champion = await self._registry.get_alias(name, self._champion_alias)
        if champion is not None and champion.version == canary.candidate_version:
            await self._decide(
                canary,
                CanaryState.STARTING,
                lambda tx, c, now: self._refuse(tx, c, now, "version is the champion already"),
            )
            return
        if champion is None:
            reason = "no champion to compare with: promoted without a canary"

            async def directly(tx: Transaction, c: Canary, now: datetime) -> None:
                c.state = CanaryState.PROMOTING
                c.direct = True
                c.reasons = [reason]
                await tx.record(self._entry(c, "canary.direct", reason, now))

            decided = await self._decide(canary, CanaryState.STARTING, directly)
            if decided is not None:
                await self._promote(decided)
            return
        champion_version = champion.version
        await self._registry.set_alias(name, self._challenger_alias, canary.candidate_version)
        try:
            served = await self._reconcile(canary.model_line, name)
        except _BAD_VERSION as error:
            await self._unloadable(canary, CanaryState.STARTING, error)
            return

        async def first_step(tx: Transaction, c: Canary, now: datetime) -> None:
            c.state = CanaryState.RUNNING
            c.champion_version = champion_version
            c.started_at = c.step_started_at = c.interval_started_at = now
            c.step = 0
            await self._shift(tx, c, c.policy.steps[0], {})
            await tx.record(
                self._entry(
                    c,
                    "rollout.step",
                    f"canary started: version {c.candidate_version} gets {c.traffic_percent}% "
                    f"beside champion {champion_version}",
                    now,
                    details={"serving": served, "sequence": c.sequence},
                )
            )

        await self._decide(canary, CanaryState.STARTING, first_step)

    async def _check(self, canary: Canary) -> None:
        """Judges the open interval once it has lasted ``interval_s`` and moves the canary on:
        a next step (emits rollout.step), promotion, or rollback (emits rollout.step and
        canary.verdict)."""
        now = self._clock()
        if not _due(canary, now) or not await self._ensure_served(canary):
            return
        now = self._clock()  # loading versions again may have taken a while
        promote = False
        async with self._store.transaction() as tx:
            current = await tx.lock_canary(canary.rollout_id)
            if (
                current is None
                or current.state is not CanaryState.RUNNING
                or not _due(current, now)
            ):
                return
            check, transition = await self._judge(tx, current, now)
            await tx.add_check(check)
            current.checks += 1
            current.metrics = check.metrics
            current.passed_in_step = transition.progress.passed_in_step
            current.failed_checks = transition.progress.failed_checks
            current.interval_index += 1
            current.interval_started_at = now
            await tx.record(
                self._entry(
                    current,
                    "check",
                    f"check {check.interval_index} at {check.traffic_percent}%: "
                    f"{check.status.value}; {transition.reason}",
                    now,
                    details={"check_id": str(check.check_id), "metrics": check.metrics},
                )
            )
            if transition.action is Action.ADVANCE:
                current.step = transition.progress.step
                current.step_started_at = now
                previous = current.traffic_percent
                share = current.policy.steps[current.step]
                await self._shift(tx, current, share, check.metrics)
                await tx.record(
                    self._entry(
                        current,
                        "rollout.step",
                        f"step {current.step}: {previous}% → {current.traffic_percent}%",
                        now,
                        details={"sequence": current.sequence},
                    )
                )
            elif transition.action is Action.PROMOTE:
                current.state = CanaryState.PROMOTING
                current.reasons = [transition.reason]
                promote = True
            elif transition.action is Action.ROLLBACK:
                failing = [r.reason for r in check.results if r.passed is False]
                await self._roll_back(tx, current, [transition.reason, *failing], now)
            await tx.save_canary(current)
        self._touched()
        log.info(
            "canary checked",
            rollout_id=str(canary.rollout_id),
            status=check.status.value,
            action=transition.action.value,
        )
        if promote:
            await self._promote(current)

    async def _judge(
        self, tx: Transaction, canary: Canary, now: datetime
    ) -> tuple[Check, Transition]:
        """The check of the canary's open interval, and where it takes the canary."""
        windows = await tx.windows(canary.rollout_id, canary.interval_index)
        feedback = await tx.feedback(canary.rollout_id)
        candidate = canary.candidate_version
        champion = canary.champion_version or ""
        inputs = {
            "candidate": windows.get(candidate, Window()),
            "champion": windows.get(champion, Window()),
            "candidate_feedback": feedback.get(candidate, Window()),
            "champion_feedback": feedback.get(champion, Window()),
        }
        analysis = analyse(**inputs, policy=canary.policy)
        transition = judge(
            Progress(
                step=canary.step,
                step_started_at=canary.step_started_at or now,
                passed_in_step=canary.passed_in_step,
                failed_checks=canary.failed_checks,
            ),
            analysis.status,
            canary.policy,
            now,
        )
        check = Check(
            check_id=uuid.uuid4(),
            rollout_id=canary.rollout_id,
            interval_index=canary.interval_index,
            step=canary.step,
            traffic_percent=canary.traffic_percent,
            started_at=canary.interval_started_at or now,
            ended_at=now,
            status=analysis.status,
            counted=analysis.status.counted,
            action=transition.action,
            results=analysis.results,
            reasons=[*analysis.reasons, transition.reason],
            metrics=analysis.metrics,
            **inputs,
        )
        return check, transition

    async def _ensure_served(self, canary: Canary) -> bool:
        """Before each check: both versions must still answer (a Triton that restarted has
        forgotten them), else they are loaded again. False when the canary ended instead."""
        name = canary.registered_model
        versions = [v for v in (canary.champion_version, canary.candidate_version) if v]
        try:
            missing = [v for v in versions if not await self._serving.ready(name, v)]
        except DependencyUnavailableError:
            # Serving is away: the logs of this interval say so, and the check judges them
            # (most likely as an outage, which does not count).
            return True
        if not missing:
            return True
        log.warning("versions in canary not served; loading them again", versions=missing)
        try:
            await self._reconcile(canary.model_line, name)
        except _BAD_VERSION as error:
            await self._unloadable(canary, CanaryState.RUNNING, error)
            return False
        return True

    async def _unloadable(
        self, canary: Canary, expected: CanaryState, error: NotFoundError | InvalidInputError
    ) -> None:
        """A version of the canary cannot be served: the candidate's fault, rolled back."""
        failure = f"candidate could not be loaded: {error.message}"

        async def fail(tx: Transaction, c: Canary, now: datetime) -> None:
            await self._roll_back(tx, c, [failure], now)

        await self._decide(canary, expected, fail)

    async def _promote(self, canary: Canary) -> None:
        """Moves ``champion`` to the candidate in the registry, then commits the promotion
        (emits rollout.step at 100 % and canary.verdict ``promoted``)."""
        name = canary.registered_model
        candidate = canary.candidate_version
        if canary.direct:
            # Nothing serves the line yet: the version must answer before traffic is sent.
            try:
                await self._reconcile(canary.model_line, name)
            except _BAD_VERSION as error:
                await self._unloadable(canary, CanaryState.PROMOTING, error)
                return
        await self._registry.set_alias(name, self._champion_alias, candidate)
        await self._drop_challenger(canary)
        await self._registry.set_tags(name, candidate, self._tags(canary, CanaryState.PROMOTED))
        if canary.champion_version is not None:
            await self._registry.set_tags(
                name, canary.champion_version, {f"{TAG_PREFIX}replaced_by": candidate}
            )

        async def promoted(tx: Transaction, c: Canary, now: datetime) -> None:
            previous = c.traffic_percent
            c.started_at = c.started_at or now
            c.step = len(c.policy.steps)
            await self._shift(tx, c, 100, c.metrics)
            self._end(c, CanaryState.PROMOTED, c.reasons, now, drain=not c.direct)
            # The registry was told before this commit.
            c.tidied = True
            await tx.emit(self._verdict(c, CanaryOutcome.PROMOTED))
            await tx.record(
                self._entry(
                    c,
                    "canary.verdict",
                    f"version {candidate} promoted to champion ({previous}% → 100%): "
                    + "; ".join(c.reasons),
                    now,
                    details={"metrics": c.metrics, "sequence": c.sequence},
                )
            )

        await self._decide(canary, CanaryState.PROMOTING, promoted)
        log.info("canary promoted", rollout_id=str(canary.rollout_id), version=candidate)

    async def _finalize(self, canary: Canary, now: datetime) -> None:
        """After a canary ended: the registry tidied at once, the versions that lost their
        traffic unloaded once drained."""
        if not canary.tidied:
            await self._tidy_registry(canary)
            async with self._store.transaction() as tx:
                current = await tx.lock_canary(canary.rollout_id)
                if current is None:
                    return
                current.tidied = True
                await tx.save_canary(current)
            canary.tidied = True
        if canary.cleanup_at is not None and now < canary.cleanup_at:
            return
        served: list[str] = []
        if canary.state in (CanaryState.PROMOTED, CanaryState.ROLLED_BACK):
            try:
                served = await self._reconcile(canary.model_line, canary.registered_model)
            except _BAD_VERSION as error:
                # Another version's files are broken; retrying will not mend them, and the
                # canary is over either way.
                log.warning(
                    "serving not reconciled", model_line=canary.model_line, error=error.message
                )
        async with self._store.transaction() as tx:
            current = await tx.lock_canary(canary.rollout_id)
            if current is None or current.finalized_at is not None:
                return
            await tx.forget(current.rollout_id)
            current.finalized_at = self._clock()
            await tx.save_canary(current)
            if canary.state in (CanaryState.PROMOTED, CanaryState.ROLLED_BACK):
                await tx.record(
                    self._entry(
                        current,
                        "canary.cleaned_up",
                        f"versions served now: {', '.join(served) or 'none'}",
                        current.finalized_at,
                        details={"serving": served},
                    )
                )
        self._touched()

    async def _tidy_registry(self, canary: Canary) -> None:
        """Record the outcome on the version; the ``challenger`` alias goes, and a ``champion``
        alias moved by a promotion that never committed goes back."""
        name = canary.registered_model
        await self._drop_challenger(canary)
        if canary.state is CanaryState.ROLLED_BACK and canary.champion_version is not None:
            champion = await self._registry.get_alias(name, self._champion_alias)
            if champion is not None and champion.version == canary.candidate_version:
                await self._registry.set_alias(name, self._champion_alias, canary.champion_version)
        try:
            await self._registry.set_tags(
                name, canary.candidate_version, self._tags(canary, canary.state)
            )
        except NotFoundError:
            log.warning("canary version is not in the registry; outcome not tagged")

    async def _drop_challenger(self, canary: Canary) -> None:
        # A newer version may hold the alias already (the validator moves it on a pass).
        name = canary.registered_model
        challenger = await self._registry.get_alias(name, self._challenger_alias)
        if challenger is not None and challenger.version == canary.candidate_version:
            await self._registry.delete_alias(name, self._challenger_alias)

    async def _reconcile(self, model_line: str, registered_model: str) -> list[str]:
        """Serve what the line needs now: both versions of its canary in progress, those of
        ended canaries still draining, and the registry's champion."""
        now = self._clock()
        needed: set[str] = set()
        for canary in await self._store.canaries(
            CanaryFilter(model_line=model_line, states=_IN_PROGRESS | _ENDED_SERVING, limit=500)
        ):
            draining = canary.state in _ENDED_SERVING and (
                canary.finalized_at is None
                and canary.cleanup_at is not None
                and now < canary.cleanup_at
            )
            if canary.state in _IN_PROGRESS or draining:
                needed.add(canary.candidate_version)
                if canary.champion_version is not None:
                    needed.add(canary.champion_version)
        champion = await self._registry.get_alias(registered_model, self._champion_alias)
        if champion is not None:
            needed.add(champion.version)
        versions = sorted(needed, key=_version_order)
        if versions:
            await self._serving.serve(registered_model, versions)
        return versions

    # --- state changes --------------------------------------------------------------------

    async def _decide(
        self,
        canary: Canary,
        expected: CanaryState,
        change: Callable[[Transaction, Canary, datetime], Awaitable[None]],
    ) -> Canary | None:
        """Apply ``change`` to the canary, locked, if it is still ``expected``; the changed
        canary, or None when it had moved on."""
        now = self._clock()
        async with self._store.transaction() as tx:
            current = await tx.lock_canary(canary.rollout_id)
            if current is None or current.state is not expected:
                return None
            await change(tx, current, now)
            await tx.save_canary(current)
        self._touched()
        return current

    async def _shift(
        self, tx: Transaction, canary: Canary, percent: int, metrics: dict[str, float]
    ) -> None:
        """Give the candidate ``percent`` of the traffic: emits rollout.step."""
        previous = canary.traffic_percent
        canary.traffic_percent = percent
        canary.sequence += 1
        event = RolloutStepV1.model_validate(
            {
                "correlation_id": canary.correlation_id,
                "causation_id": canary.validated_event_id,
                "payload": RolloutStepPayload(
                    rollout_id=canary.rollout_id,
                    project_id=canary.project_id,
                    model_line=canary.model_line,
                    registered_model=canary.registered_model,
                    candidate_version=canary.candidate_version,
                    champion_version=canary.champion_version,
                    step=canary.step,
                    traffic_percent=percent,
                    previous_percent=previous,
                    metrics=metrics,
                    sequence=canary.sequence,
                ),
            }
        )
        canary.last_step = event.model_dump(mode="json")
        await tx.emit(event)

    async def _roll_back(
        self,
        tx: Transaction,
        canary: Canary,
        reasons: list[str],
        now: datetime,
        *,
        actor: str | None = None,
    ) -> None:
        """All traffic back to the champion: emits rollout.step (0 %) when the candidate had
        any, and canary.verdict ``rolled_back``."""
        previous = canary.traffic_percent
        # A candidate that never got traffic has no requests in flight: it goes at once.
        had_traffic = canary.sequence > 0
        if had_traffic:
            await self._shift(tx, canary, 0, canary.metrics)
        canary.decided_by = actor or canary.decided_by
        self._end(canary, CanaryState.ROLLED_BACK, reasons, now, drain=had_traffic)
        await tx.emit(self._verdict(canary, CanaryOutcome.ROLLED_BACK))
        await tx.record(
            self._entry(
                canary,
                "canary.verdict",
                f"version {canary.candidate_version} rolled back ({previous}% → 0%): "
                + "; ".join(reasons),
                now,
                actor=actor or ACTOR,
                details={"metrics": canary.metrics, "sequence": canary.sequence},
            )
        )
        log.warning(
            "canary rolled back",
            rollout_id=str(canary.rollout_id),
            version=canary.candidate_version,
            reasons=reasons,
        )

    async def _refuse(self, tx: Transaction, canary: Canary, now: datetime, reason: str) -> None:
        self._end(canary, CanaryState.REFUSED, [reason], now)
        await tx.record(self._entry(canary, "canary.refused", reason, now))

    def _end(
        self,
        canary: Canary,
        state: CanaryState,
        reasons: list[str],
        now: datetime,
        *,
        drain: bool = False,
    ) -> None:
        canary.state = state
        canary.reasons = list(reasons)
        canary.finished_at = now
        canary.cleanup_at = now + self._drain if drain else now

    def _verdict(self, canary: Canary, outcome: CanaryOutcome) -> CanaryVerdictV1:
        return CanaryVerdictV1.model_validate(
            {
                "correlation_id": canary.correlation_id,
                "causation_id": canary.validated_event_id,
                "payload": CanaryVerdictPayload(
                    rollout_id=canary.rollout_id,
                    project_id=canary.project_id,
                    model_line=canary.model_line,
                    registered_model=canary.registered_model,
                    candidate_version=canary.candidate_version,
                    champion_version=canary.champion_version,
                    verdict=outcome,
                    reasons=canary.reasons,
                    metrics=canary.metrics,
                ),
            }
        )

    def _tags(self, canary: Canary, state: CanaryState) -> dict[str, str]:
        return {
            f"{TAG_PREFIX}verdict": state.value,
            f"{TAG_PREFIX}rollout_id": str(canary.rollout_id),
            f"{TAG_PREFIX}champion_version": canary.champion_version or "none",
            f"{TAG_PREFIX}checks": str(canary.checks),
            f"{TAG_PREFIX}failed_checks": str(canary.failed_checks),
            f"{TAG_PREFIX}reasons": "\n".join(canary.reasons)[:MAX_TAG_VALUE],
        }

    def _entry(
        self,
        canary: Canary,
        kind: str,
        summary: str,
        at: datetime,
        *,
        actor: str = ACTOR,
        details: dict[str, Any] | None = None,
    ) -> TimelineEntry:
        return TimelineEntry(
            model_line=canary.model_line,
            project_id=canary.project_id,
            rollout_id=canary.rollout_id,
            correlation_id=canary.correlation_id,
            kind=kind,
            actor=actor,
            summary=summary,
            details={
                "candidate_version": canary.candidate_version,
                "champion_version": canary.champion_version,
                "traffic_percent": canary.traffic_percent,
                "state": canary.state.value,
            }
            | (details or {}),
            at=at,
        )

    def _touched(self) -> None:
        """Something changed: the driver ticks now and logs re-read which canaries run."""
        self._live_loaded = None
        self.changed.set()

    async def _live_canary(self, model_line: str) -> _Live | None:
        # Logs are many and canaries few: which lines run a canary is read at most once per
        # ``live_cache_s`` (and at once after a change made here), not once per log.
        stale = (
            self._live_loaded is None or time.monotonic() - self._live_loaded >= self._live_cache_s
        )
        if stale:
            running = await self._store.canaries(
                CanaryFilter(states=frozenset({CanaryState.RUNNING}), limit=10_000)
            )
            self._live = {
                c.model_line: _Live(
                    c.rollout_id, c.registered_model, c.candidate_version, c.champion_version
                )
                for c in running
            }
            self._live_loaded = time.monotonic()
        return self._live.get(model_line)


_IN_PROGRESS = ACTIVE_STATES
_ENDED_SERVING = frozenset({CanaryState.PROMOTED, CanaryState.ROLLED_BACK})


def _due(canary: Canary, now: datetime) -> bool:
    started = canary.interval_started_at
    return started is not None and now >= started + timedelta(seconds=canary.policy.interval_s)


def _version_order(version: str) -> tuple[int, str]:
    return (int(version), version) if version.isdigit() else (0, version)


def _by(what: str, actor: str, reason: str | None) -> str:
    return f"{what} by {actor}" + (f": {reason}" if reason else "")


def _heard(
    event: Event[Any],
    model_line: str | None,
    project_id: str,
    summary: str,
    details: dict[str, Any],
    at: datetime,
) -> TimelineEntry:
    """A timeline entry for an event the service heard.

    Entries are timed by this service's clock when it heard the event, like its own moves, so
    the timeline has one time base; the producer's time is kept in the details.
    """
    return TimelineEntry(
        model_line=model_line,
        project_id=project_id,
        correlation_id=event.correlation_id,
        event_id=event.event_id,
        kind=event.type,
        actor=PRODUCERS.get(event.type, event.type),
        summary=summary,
        details=details | {"occurred_at": event.occurred_at.isoformat()},
        at=at,
    )
