"""``flywheel demo``: the whole loop on MNIST, played end to end against the running stack.

1. Bootstrap (once per project): create the project through labeling's API and post MNIST
   labels until the retrain threshold fires; the loop itself trains, validates and promotes
   the first version (rollout promotes a line's first version without a canary).
2. Play a labeling tool: for fresh MNIST images ask ``/predict`` for a pre-fill, then post the
   true class with the prediction's id, version and class, confirming or correcting it, until
   the threshold fires again. The ``poisoned`` scenario instead re-labels digits the project
   already has in one batch, their classes shuffled among them.
3. Keep traffic and labeler feedback flowing while the loop trains, validates and canaries
   the new version, and report each step as its event arrives on the bus.
4. Score the versions on a frozen test set (the first images of MNIST's test part) and print a
   summary, ending with one JSON line.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import httpx
import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.table import Table

from flywheel_cli.bus import EventFollower
from flywheel_cli.endpoints import stack_urls
from flywheel_cli.registry import CHAMPION, MlflowRegistry, VersionView
from flywheel_cli.scenarios import SCENARIOS, DemoError, DemoOptions
from flywheel_cli.services import ServiceError, Services, predict_headers
from flywheel_cli.settings import CliSettings, DemoSettings
from flywheel_cli.stack import Stack
from flywheel_cli.state import StackState
from flywheel_cli.supervise import is_running
from flywheel_clients.registry import ModelRegistry
from flywheel_contracts import (
    CanaryOutcome,
    CanaryVerdictV1,
    DataQualityFailedV1,
    Event,
    ModelTrainedV1,
    ModelValidatedV1,
    RolloutStepV1,
    ThresholdReachedV1,
    TrainingFailedV1,
    ValidationVerdict,
)
from flywheel_vision.data import load_mnist, to_png
from flywheel_vision.evaluate import evaluate

REQUIRED: Final = (
    "labeling",
    "data-monitor",
    "trainer-dispatch",
    "validator",
    "rollout",
    "inference-bff",
)
"""Services the demo cannot run without."""

EXPECTED: Final = {
    "normal": ("promoted",),
    "poisoned": ("rejected", "rolled_back", "quarantined"),
}
"""Verdicts that show the loop doing its job in each scenario."""
QUIET_COUNT: Final = 1_000_000
"""Retrain count set once the demo's retrain fired (so canary feedback cannot fire another),
and while the poisoned batch is judged."""
BATCH: Final = 250
"""Labels per ``labels:batch`` request while bootstrapping."""
MAX_BATCH: Final = 500
"""labeling's default cap on one batch request."""


@dataclass(frozen=True)
class Prefill:
    """What ``/predict`` answered for one image, as a labeling tool shows it."""

    prediction_id: str
    model_version: str
    predicted_class: str
    confidence: float | None


def parse_prediction(body: dict[str, Any]) -> Prefill:
    """The pre-fill of a ``/predict`` answer."""
    try:
        return Prefill(
            prediction_id=str(body["prediction_id"]),
            model_version=str(body["model_version"]),
            predicted_class=str(body["predicted_class"]),
            confidence=None if body.get("confidence") is None else float(body["confidence"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise DemoError(f"/predict answered something else than a prediction: {body}") from error


@dataclass
class Counters:
    labels: int = 0
    confirmed: int = 0
    corrected: int = 0
    predictions: int = 0
    prediction_errors: int = 0
    by_version: dict[str, int] = field(default_factory=dict)

    def served(self, version: str) -> None:
        self.predictions += 1
        self.by_version[version] = self.by_version.get(version, 0) + 1

    def served_text(self) -> str:
        """Predictions per version, e.g. ``v1: 90, v2: 10``."""
        return ", ".join(f"v{v}: {n}" for v, n in sorted(self.by_version.items())) or "none"


class Pacer:
    """Spaces the calls of several workers to ``rate`` per second together: the demo plays
    people at a labeling tool, and a two-core machine's services must keep up with them."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next = time.monotonic()

    async def wait(self) -> None:
        now = time.monotonic()
        slot = max(now, self._next)
        self._next = slot + self._interval
        await asyncio.sleep(slot - now)


@dataclass
class Outcome:
    """How the loop answered the demo's retrain."""

    verdict: str
    """promoted, rolled_back, rejected, quarantined, training_failed or timeout."""
    stopped_by: str | None = None
    """What refused the retrain, when something did."""
    candidate_version: str | None = None
    reasons: list[str] = field(default_factory=list)
    validated_accuracy: float | None = None
    """The candidate's accuracy on the snapshot's held-out split, as the validator measured."""


class MnistFeed:
    """MNIST training images for labels: fresh ones handed out once each (labeling's quality
    checks quarantine batches that re-label images), skipping those the project labeled in
    earlier runs."""

    def __init__(self, labeled: set[int]) -> None:
        self.images, self.classes = load_mnist("train")
        self.labeled = set(labeled)
        self._next = 0

    def take(self, count: int) -> list[int]:
        """``count`` images the project has no label for yet."""
        indices: list[int] = []
        while len(indices) < count:
            if self._next >= len(self.images):
                raise DemoError("every MNIST training image is labeled in this project")
            if self._next not in self.labeled:
                indices.append(self._next)
                self.labeled.add(self._next)
            self._next += 1
        return indices

    def png(self, index: int) -> bytes:
        return to_png(np.asarray(self.images[index]))

    def true_class(self, index: int) -> str:
        return str(int(self.classes[index]))


def mnist_index(external_id: str | None) -> int | None:
    """The MNIST training index the demo put in a label's ``external_id``."""
    prefix = "mnist-train-"
    if external_id is None or not external_id.startswith(prefix):
        return None
    number = external_id.removeprefix(prefix)
    return int(number) if number.isdigit() else None


class Demo:
    """One run of the demo against a running stack."""

    def __init__(
        self, settings: CliSettings, state: StackState, console: Console, scenario: str
    ) -> None:
        self.settings = settings
        self.cfg: DemoSettings = settings.demo
        self.urls = stack_urls(settings, state)
        self.namespace = state.namespace
        self.console = console
        self.scenario = scenario
        self.counters = Counters()
        """What the labeling tool and the canary traffic did (bootstrap labels not counted)."""
        self.bootstrap_labels = 0
        self.started = time.monotonic()
        self.started_at = datetime.now(UTC)
        self._steps_shown: set[tuple[uuid.UUID, int]] = set()
        self._services: Services | None = None
        self._registry: MlflowRegistry | None = None
        self._bus: EventFollower | None = None
        self._test_set: tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]] | None = None

    # --- plumbing ---------------------------------------------------------------------------

    @property
    def services(self) -> Services:
        if self._services is None:
            raise RuntimeError("demo not started")
        return self._services

    @property
    def registry(self) -> MlflowRegistry:
        if self._registry is None:
            raise RuntimeError("demo not started")
        return self._registry

    @property
    def bus(self) -> EventFollower:
        if self._bus is None:
            raise RuntimeError("demo not started")
        return self._bus

    def say(self, message: str, style: str = "") -> None:
        elapsed = time.monotonic() - self.started
        self.console.print(
            f"[dim]{elapsed:7.1f}s[/] {message}", style=style, highlight=False, soft_wrap=True
        )

    def ours(self, event: Event[Any]) -> bool:
        payload = event.payload
        return (
            getattr(payload, "project_id", None) == self.cfg.project_id
            or getattr(payload, "model_line", None) == self.cfg.model_line
        )

    # --- the run ----------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        timeout = httpx.Timeout(self.settings.http_timeout_s, connect=5.0)
        limits = httpx.Limits(max_connections=4 * self.cfg.labelers + 8)
        async with (
            httpx.AsyncClient(timeout=timeout, limits=limits) as client,
            EventFollower(
                self.settings.platform.rabbit_url.get_secret_value(), self.namespace
            ) as bus,
        ):
            self._services = Services(self.settings, self.urls, client)
            self._registry = MlflowRegistry(client, self.urls["mlflow"])
            self._bus = bus
            return await self._run()

    async def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        await self._ensure_project()
        labeled = await self.services.external_ids(cfg.project_id)
        feed = MnistFeed({i for i in map(mnist_index, labeled) if i is not None})
        champion = await self.registry.alias(cfg.model_line, CHAMPION)
        if champion is None:
            champion = await self._bootstrap(feed)
        else:
            self.say(f"champion of {cfg.model_line} is v{champion.version}: no bootstrap needed")
        previous = champion.version
        await self._wait_serving()
        previous_accuracy = await self.frozen_accuracy(previous)
        self.say(
            f"champion v{previous}: accuracy {previous_accuracy:.4f} on the frozen test set "
            f"({cfg.test_images} MNIST test images)"
        )

        if self.scenario == "poisoned":
            # Quality checks judge every batch; with no retrain due, the batch alone is judged.
            await self._set_count(QUIET_COUNT)
            fired = await self._post_poisoned(feed)
        else:
            await self._set_count(cfg.retrain_labels)
            fired = await self._label_until_threshold(feed)
            await self._set_count(QUIET_COUNT)

        validated, stop = asyncio.Event(), asyncio.Event()
        traffic = asyncio.create_task(self._canary_traffic(feed, validated, stop))
        try:
            outcome = await self._follow(fired, on_validated=validated.set)
        finally:
            stop.set()
            await traffic

        current = await self.registry.alias(cfg.model_line, CHAMPION)
        champion_version = current.version if current is not None else previous
        champion_accuracy = (
            previous_accuracy
            if champion_version == previous
            else await self.frozen_accuracy(champion_version)
        )
        candidate_accuracy = None
        if outcome.candidate_version is not None:
            candidate_accuracy = (
                champion_accuracy
                if outcome.candidate_version == champion_version
                else await self.frozen_accuracy(outcome.candidate_version)
            )
        summary = {
            "scenario": self.scenario,
            "verdict": outcome.verdict,
            "champion_version": champion_version,
            "champion_accuracy": round(champion_accuracy, 4),
            "previous_version": previous,
            "previous_accuracy": round(previous_accuracy, 4),
            "candidate_version": outcome.candidate_version,
            "candidate_accuracy": None
            if candidate_accuracy is None
            else round(candidate_accuracy, 4),
            "stopped_by": outcome.stopped_by,
            "expected": outcome.verdict in EXPECTED[self.scenario],
        }
        self._print_summary(summary, outcome)
        return summary

    # --- project and bootstrap --------------------------------------------------------------

    async def _ensure_project(self) -> None:
        cfg = self.cfg
        await self.services.create_project(
            {
                "project_id": cfg.project_id,
                "name": "MNIST digits (flywheel demo)",
                "class_names": [str(digit) for digit in range(10)],
                "model_line": cfg.model_line,
                "policy": {"count": cfg.bootstrap_labels},
            }
        )
        self.say(f"project {cfg.project_id} → model line {cfg.model_line}")

    async def _set_count(self, count: int) -> None:
        await self.services.update_project(self.cfg.project_id, {"policy": {"count": count}})

    async def _bootstrap(self, feed: MnistFeed) -> VersionView:
        """Post labels until the loop trains, validates and promotes a first champion."""
        cfg = self.cfg
        await self._set_count(cfg.bootstrap_labels)
        self.say(f"bootstrap: posting {cfg.bootstrap_labels} MNIST labels in batches", "bold")
        indices = feed.take(cfg.bootstrap_labels)
        for start in range(0, len(indices), BATCH):
            chunk = indices[start : start + BATCH]
            await self.services.post_batch(
                cfg.project_id,
                [self._batch_item(feed, i, feed.true_class(i)) for i in chunk],
                labeler="demo-bootstrap",
            )
        self.say(f"bootstrap: {len(indices)} labels saved")
        self.bootstrap_labels = len(indices)
        outcome = await self._follow(None, timeout_s=cfg.bootstrap_timeout_s)
        champion = await self.registry.alias(cfg.model_line, CHAMPION)
        if champion is None:
            raise DemoError(
                f"no champion after bootstrap: {outcome.verdict} "
                f"({outcome.stopped_by or 'no verdict'}): {'; '.join(outcome.reasons)}"
            )
        return champion

    def _batch_item(self, feed: MnistFeed, index: int, class_name: str) -> dict[str, Any]:
        return {
            "image_base64": base64.b64encode(feed.png(index)).decode("ascii"),
            "class_name": class_name,
            "external_id": f"mnist-train-{index}",
        }

    async def _wait_serving(self) -> None:
        """Wait until the BFF answers with the champion (rollout loads it into Triton)."""
        headers = predict_headers(self.settings, "demo-probe")
        png = to_png(np.asarray(load_mnist("validation", limit=1)[0][0]))
        deadline = time.monotonic() + self.cfg.bootstrap_timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                parse_prediction(await self.services.predict(png, headers, self.cfg.model_line))
            except (ServiceError, httpx.HTTPError, DemoError) as error:
                last = error
                await asyncio.sleep(1.0)
                continue
            self.say("inference-bff serves the champion")
            return
        raise DemoError(f"inference-bff never served {self.cfg.model_line}: {last}")

    # --- playing the labeling tool ----------------------------------------------------------

    async def _prefill_and_label(self, feed: MnistFeed, index: int, labeler: str) -> None:
        headers = predict_headers(self.settings, labeler)
        png = feed.png(index)
        prefill = parse_prediction(await self.services.predict(png, headers, self.cfg.model_line))
        self.counters.served(prefill.model_version)
        truth = feed.true_class(index)
        fields = {
            "class_name": truth,
            "prediction_id": prefill.prediction_id,
            "model_version": prefill.model_version,
            "predicted_class": prefill.predicted_class,
            "external_id": f"mnist-train-{index}",
        }
        if prefill.confidence is not None:
            fields["confidence"] = f"{prefill.confidence:.6f}"
        await self.services.post_label(self.cfg.project_id, png, fields, headers)
        self.counters.labels += 1
        if truth == prefill.predicted_class:
            self.counters.confirmed += 1
        else:
            self.counters.corrected += 1

    async def _label_until_threshold(self, feed: MnistFeed) -> ThresholdReachedV1:
        """Labelers confirm or correct pre-fills until data-monitor fires the retrain."""
        self.say(
            f"labeling tool: {self.cfg.labelers} labelers confirm or correct pre-fills until "
            f"{self.cfg.retrain_labels} new labels fire a retrain",
            "bold",
        )
        stop = asyncio.Event()
        indices = iter(feed.take(self.cfg.retrain_labels * 3))
        pacer = Pacer(self.cfg.label_rate)

        async def labeler(n: int) -> None:
            for index in indices:
                await pacer.wait()
                if stop.is_set():
                    return
                await self._prefill_and_label(feed, index, f"demo-labeler-{n}")

        workers = [asyncio.create_task(labeler(n)) for n in range(self.cfg.labelers)]
        try:
            with self.console.status("labeling") as spinner:
                while True:
                    if all(w.done() for w in workers):
                        for w in workers:
                            w.result()
                        raise DemoError("labels ran out before the threshold fired")
                    event = await self.bus.next(1.0)
                    c = self.counters
                    spinner.update(
                        f"labeling: {c.labels} labels, {c.confirmed} confirmed, "
                        f"{c.corrected} corrected"
                    )
                    if isinstance(event, ThresholdReachedV1) and self.ours(event):
                        self._show(event)
                        return event
                    if event is not None and self.ours(event):
                        self._show(event)
        finally:
            stop.set()
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            self.say(
                f"labeling tool: {self.counters.labels} labels "
                f"({self.counters.confirmed} confirmed, {self.counters.corrected} corrected)"
            )

    async def _post_poisoned(self, feed: MnistFeed) -> ThresholdReachedV1 | None:
        """Labels already in the project posted again in one batch, their classes shuffled
        among them: the label-flipping a careless or hostile labeler does."""
        indices = sorted(feed.labeled)[: min(self.cfg.poisoned_labels, MAX_BATCH)]
        if not indices:
            raise DemoError("the project has no labels to poison")
        order = np.random.default_rng(7).permutation(len(indices))
        shuffled = [feed.true_class(indices[int(k)]) for k in order]
        wrong = sum(a != feed.true_class(i) for a, i in zip(shuffled, indices, strict=True))
        self.say(
            f"poisoned: labeler 'mallory' re-labels {len(indices)} digits with their classes "
            f"shuffled ({wrong} now wrong) in one batch",
            "bold red",
        )
        await self.services.post_batch(
            self.cfg.project_id,
            [self._batch_item(feed, i, c) for i, c in zip(indices, shuffled, strict=True)],
            labeler="mallory",
        )
        self.counters.labels += len(indices)
        return None

    async def _canary_traffic(
        self, feed: MnistFeed, started: asyncio.Event, stop: asyncio.Event
    ) -> None:
        """Once the new version is validated: prediction traffic on a small fixed pool (so
        both versions answer the same inputs) and a trickle of labeled pre-fills (so rollout
        can compare their corrections), both paced."""
        # Prediction-only images come from MNIST's validation part: they are never labeled.
        pool_images, _ = load_mnist("validation", limit=self.cfg.canary_pool)
        cycle: Iterator[bytes] = itertools.cycle([to_png(np.asarray(i)) for i in pool_images])
        feedback = iter(feed.take(self.cfg.canary_feedback_labels))
        headers = predict_headers(self.settings, "demo-traffic")
        requests, labels = Pacer(self.cfg.canary_request_rate), Pacer(self.cfg.canary_label_rate)
        waiting = asyncio.create_task(started.wait())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if stop.is_set():
            return

        async def predictor() -> None:
            while not stop.is_set():
                await requests.wait()
                try:
                    prefill = parse_prediction(
                        await self.services.predict(next(cycle), headers, self.cfg.model_line)
                    )
                except (ServiceError, httpx.HTTPError, DemoError):
                    self.counters.prediction_errors += 1
                    continue
                self.counters.served(prefill.model_version)

        async def labeler(n: int) -> None:
            for index in feedback:
                await labels.wait()
                if stop.is_set():
                    return
                try:
                    await self._prefill_and_label(feed, index, f"demo-labeler-{n}")
                except (ServiceError, httpx.HTTPError, DemoError):
                    self.counters.prediction_errors += 1

        tasks = [asyncio.create_task(predictor()) for _ in range(2)]
        tasks += [asyncio.create_task(labeler(n)) for n in range(2)]
        await stopping
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- following the loop -----------------------------------------------------------------

    def _show(self, event: Event[Any]) -> None:
        p = event.payload
        if isinstance(event, ThresholdReachedV1):
            self.say(
                f"threshold.reached: {p.labels_since_last} labels since the last retrain "
                f"(threshold {p.threshold}, {p.reason}) → retrain on {p.snapshot_id[:16]}",
                "cyan",
            )
        elif isinstance(event, DataQualityFailedV1):
            self.say(
                f"data.quality_failed: {len(p.quarantined_label_ids)} labels quarantined: "
                f"{'; '.join(p.reasons)}",
                "red",
            )
        elif isinstance(event, ModelTrainedV1):
            keys = ("val_accuracy", "train_loss", "train_seconds")
            metrics = ", ".join(f"{k} {p.metrics[k]:.4g}" for k in keys if k in p.metrics)
            base = f" from v{p.base_model_version}" if p.base_model_version else " from scratch"
            self.say(
                f"model.trained: {p.registered_model} v{p.model_version}{base} ({metrics})", "cyan"
            )
        elif isinstance(event, TrainingFailedV1):
            self.say(f"training.failed: {p.reason}", "red")
        elif isinstance(event, ModelValidatedV1):
            accuracy = p.candidate_metrics.get("accuracy")
            against = p.champion_metrics.get("accuracy")
            versus = (
                f" vs champion v{p.champion_version} {against:.4f}" if against is not None else ""
            )
            shown = "-" if accuracy is None else f"{accuracy:.4f}"
            style = "green" if p.verdict is ValidationVerdict.PASSED else "red"
            self.say(
                f"model.validated: v{p.model_version} {p.verdict.value}, held-out accuracy "
                f"{shown}{versus}",
                style,
            )
            if p.verdict is not ValidationVerdict.PASSED:
                for reason in p.reasons:
                    self.say(f"    {reason}", "red")
        elif isinstance(event, RolloutStepV1):
            if (
                p.rollout_id,
                p.sequence,
            ) in self._steps_shown or event.occurred_at < self.started_at:
                return  # rollout republishes the current weights now and then
            self._steps_shown.add((p.rollout_id, p.sequence))
            analysis = ", ".join(f"{k} {v:.3g}" for k, v in sorted(p.metrics.items())[:6])
            self.say(
                f"rollout.step: v{p.candidate_version} {p.previous_percent}% → "
                f"{p.traffic_percent}% of traffic (served so far "
                f"{self.counters.served_text()}){f'; {analysis}' if analysis else ''}",
                "cyan",
            )
        elif isinstance(event, CanaryVerdictV1):
            style = "green" if p.verdict is CanaryOutcome.PROMOTED else "red"
            reasons = f": {'; '.join(p.reasons)}" if p.reasons else ""
            self.say(f"canary.verdict: v{p.candidate_version} {p.verdict.value}{reasons}", style)

    async def _follow(
        self,
        fired: ThresholdReachedV1 | None,
        *,
        timeout_s: float | None = None,
        on_validated: Callable[[], None] | None = None,
    ) -> Outcome:
        """Report the loop's events for our line until it reaches a verdict on the retrain.

        With ``fired`` unknown (bootstrap, poisoned batch) the first threshold.reached of the
        project is the retrain followed.
        """
        deadline = time.monotonic() + (timeout_s or self.cfg.loop_timeout_s)
        correlation = fired.correlation_id if fired is not None else None
        candidate: str | None = None
        validated_accuracy: float | None = None
        with self.console.status("waiting for the loop") as spinner:
            while time.monotonic() < deadline:
                event = await self.bus.next(1.0)
                c = self.counters
                spinner.update(
                    f"waiting for the loop: {c.predictions} predictions served "
                    f"({c.served_text()}), {c.labels} labels"
                )
                if event is None or not self.ours(event):
                    continue
                self._show(event)
                if isinstance(event, DataQualityFailedV1) and correlation is None:
                    return Outcome(
                        "quarantined",
                        "data-monitor quality quarantine",
                        reasons=list(event.payload.reasons),
                    )
                if isinstance(event, ThresholdReachedV1) and correlation is None:
                    correlation = event.correlation_id
                    continue
                if correlation is None or event.correlation_id != correlation:
                    continue
                if isinstance(event, TrainingFailedV1):
                    return Outcome("training_failed", "trainer", reasons=[event.payload.reason])
                if isinstance(event, ModelTrainedV1):
                    candidate = event.payload.model_version
                elif isinstance(event, ModelValidatedV1):
                    candidate = event.payload.model_version
                    validated_accuracy = event.payload.candidate_metrics.get("accuracy")
                    if event.payload.verdict is not ValidationVerdict.PASSED:
                        return Outcome(
                            "rejected",
                            "validator",
                            candidate,
                            list(event.payload.reasons),
                            validated_accuracy,
                        )
                    if on_validated is not None:
                        on_validated()
                elif isinstance(event, CanaryVerdictV1):
                    p = event.payload
                    if p.verdict is CanaryOutcome.PROMOTED:
                        return Outcome(
                            "promoted",
                            None,
                            p.candidate_version,
                            list(p.reasons),
                            validated_accuracy,
                        )
                    return Outcome(
                        "rolled_back",
                        "canary rollback",
                        p.candidate_version,
                        list(p.reasons),
                        validated_accuracy,
                    )
        return Outcome(
            "timeout", None, candidate, ["no verdict before the timeout"], validated_accuracy
        )

    # --- scoring ----------------------------------------------------------------------------

    async def frozen_accuracy(self, version: str) -> float:
        """Accuracy of ``version``'s ONNX on the frozen test set, served the way Triton runs it."""
        if self._test_set is None:
            self._test_set = load_mnist("test", limit=self.cfg.test_images)
        images, classes = self._test_set
        registry = ModelRegistry(self.urls["mlflow"])
        files = await registry.download_model_files(self.cfg.model_line, version)
        samples = [
            (to_png(np.asarray(image)), int(c)) for image, c in zip(images, classes, strict=True)
        ]
        result = await asyncio.to_thread(
            evaluate, files.onnx, samples, classes=files.labels, latency_images=0
        )
        return result.accuracy

    def _print_summary(self, summary: dict[str, Any], outcome: Outcome) -> None:
        table = Table(title="Flywheel demo", title_justify="left", show_header=False)
        table.add_column("what", style="bold")
        table.add_column("value")

        def accuracy(value: Any) -> str:
            return "-" if value is None else f"{value:.4f}"

        table.add_row("scenario", self.scenario)
        if self.bootstrap_labels:
            table.add_row("bootstrap", f"{self.bootstrap_labels} labels → first champion")
        style = "green" if outcome.verdict == "promoted" else "red"
        if self.scenario == "poisoned" and outcome.verdict in (
            "rejected",
            "rolled_back",
            "quarantined",
        ):
            style = "green"
        table.add_row("verdict", f"[{style}]{outcome.verdict}[/]")
        if outcome.stopped_by:
            table.add_row("stopped by", outcome.stopped_by)
        for reason in outcome.reasons[:6]:
            table.add_row("", reason)
        table.add_row(
            "previous champion",
            f"v{summary['previous_version']}, frozen-test accuracy "
            f"{accuracy(summary['previous_accuracy'])}",
        )
        if summary["candidate_version"] is not None:
            held_out = accuracy(outcome.validated_accuracy)
            table.add_row(
                "candidate",
                f"v{summary['candidate_version']}, frozen-test accuracy "
                f"{accuracy(summary['candidate_accuracy'])} (validator's held-out {held_out})",
            )
        table.add_row(
            "champion now",
            f"v{summary['champion_version']}, frozen-test accuracy "
            f"{accuracy(summary['champion_accuracy'])}",
        )
        c = self.counters
        answered = c.confirmed + c.corrected
        prefills = f" ({c.confirmed} confirmed, {c.corrected} corrected)" if answered else ""
        table.add_row(
            "traffic",
            f"{c.predictions} predictions ({c.served_text()}), {c.labels} labels{prefills}",
        )
        table.add_row(
            "loop time", f"{time.monotonic() - self.started:.1f}s (stack start-up not counted)"
        )
        self.console.print(table)


def run_demo(settings: CliSettings, options: DemoOptions, console: Console) -> dict[str, Any]:
    """Bring the stack up if needed, run the demo, bring it down unless asked to keep it."""
    if options.scenario not in SCENARIOS:
        raise DemoError(f"unknown scenario {options.scenario!r}; choose from {SCENARIOS}")
    started = time.monotonic()
    stack = Stack(settings, report=lambda line: console.print(f"  {line}", highlight=False))
    state = stack.state_file.load()
    running = {n for n, c in (state.components if state else {}).items() if is_running(c)}
    owns_stack = not running
    if not set(REQUIRED) <= running:
        console.print("[bold]bringing the stack up[/]")
        stack.up(pick_free_ports=options.free_ports)
        state = stack.state_file.load()
    if state is None or not set(REQUIRED) <= set(state.components):
        missing = sorted(set(REQUIRED) - set(state.components if state else {}))
        raise DemoError(f"the demo needs {', '.join(missing)}, which did not start")
    try:
        summary = asyncio.run(Demo(stack.settings, state, console, options.scenario).run())
    finally:
        if owns_stack and not options.keep:
            console.print("[bold]bringing the stack down[/] (--keep leaves it running)")
            stack.down()
    summary["wall_time_s"] = round(time.monotonic() - started, 1)
    return summary
