"""Drift tests: a window of production inferences against the champion's training reference.

Pure functions of arrays; the service feeds them from the inference logs (current window) and
the reference the champion's training snapshot gave (computed once per version). Three kinds:

* ``embedding``: a domain classifier (logistic regression, out-of-fold) asked to tell current
  embeddings from reference ones. Its ROC AUC is the effect size an operator can read (0.5: the
  classifier cannot tell them apart) and the Mann-Whitney U test of its out-of-fold scores gives
  the p-value. Chosen over MMD because "a classifier separates them with AUC 0.93" is a number
  people act on, and it costs one small fit per window.
* ``statistic``: per image statistic (brightness, contrast, size), the two-sample
  Kolmogorov-Smirnov test (p-value) and the population stability index (effect size, on the
  reference's deciles).
* ``classes``: chi-square test of the predicted-class counts against the reference's.

Each test judges only with at least ``min_samples`` on both sides, and calls drift only when the
p-value is below ``p_value`` *and* the effect size passes its threshold: with thousands of
logs a significant but negligible difference must not wake anybody up (and retrain nothing).
scipy and scikit-learn supply the statistics; nothing here is written by hand beyond PSI.
"""

from __future__ import annotations

import math
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats  # type: ignore[import-untyped]

from flywheel_contracts.events import DriftAction
from flywheel_runtime.drift_reference import STATISTICS as DRIFT_STATISTICS

__all__ = [
    "STATISTICS",
    "DriftReport",
    "DriftTest",
    "DriftThresholds",
    "EmbeddingDrift",
    "Evaluation",
    "Features",
    "LabelCandidate",
    "choose_action",
    "classes_test",
    "embedding_test",
    "evaluate",
    "most_drifted",
    "population_stability_index",
    "statistic_test",
]

TestKind = Literal["embedding", "statistic", "classes"]
Floats = npt.NDArray[np.float64]

STATISTICS: Final = DRIFT_STATISTICS
"""Per-image statistics compared (``flywheel_contracts.ImageStatistics``)."""

_MIN_EXPECTED: Final = 5.0
"""Smallest expected count per cell the chi-square test trusts."""

_PSI_EPSILON: Final = 1e-4
"""Share given to an empty bin, so PSI stays finite."""

LABEL_CUT_QUANTILE: Final = 0.99
"""Share of the reference that scores at most the cut for label requests (``most_drifted``)."""


class DriftThresholds(BaseModel):
    """When a test judges and when it calls drift."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    min_samples: int = Field(default=200, ge=10)
    """Fewest inferences of the window a test needs before it judges."""

    min_reference_samples: int = Field(default=200, ge=10)
    """Fewest reference images (the version's held-out data) a test needs before it judges."""

    p_value: float = Field(default=0.001, gt=0, lt=1)
    """Significance level of every test (several run per window, so it is strict)."""

    min_auc: float = Field(default=0.7, gt=0.5, le=1)
    """Domain-classifier AUC from which embeddings count as drifted."""

    min_psi: float = Field(default=0.2, gt=0)
    """Population stability index from which a statistic counts as drifted (0.1-0.2 is a
    moderate shift by the usual reading, above 0.2 a large one)."""

    min_class_shift: float = Field(default=0.1, gt=0, le=1)
    """Total variation distance of the predicted-class mix from which it counts as drifted."""

    max_samples: int = Field(default=2000, ge=10)
    """Most samples per side a test uses (a deterministic subsample beyond that)."""


class DriftTest(BaseModel):
    """One test's result, with the numbers behind it."""

    model_config = ConfigDict(frozen=True)

    kind: TestKind
    feature: str
    """What was compared: ``embedding``, a statistic's name, ``predicted_class``."""
    judged: bool
    """False when either side had fewer than ``min_samples``; such a test reports no drift."""
    drifted: bool
    statistic: float | None = None
    """The test statistic (U, KS D, chi-square)."""
    p_value: float | None = None
    effect: float | None = None
    """AUC, PSI or total variation distance: what the effect threshold applies to."""
    threshold: float
    """The effect threshold the test used."""
    reference_samples: int
    current_samples: int
    details: dict[str, Any] = Field(default_factory=dict)


def _subsample(values: npt.NDArray[Any], limit: int, seed: int) -> npt.NDArray[Any]:
    if len(values) <= limit:
        return values
    picked = np.random.default_rng(seed).choice(len(values), size=limit, replace=False)
    return values[np.sort(picked)]


def _unjudged(
    kind: TestKind, feature: str, threshold: float, reference: int, current: int
) -> DriftTest:
    return DriftTest(
        kind=kind,
        feature=feature,
        judged=False,
        drifted=False,
        threshold=threshold,
        reference_samples=reference,
        current_samples=current,
    )


@dataclass(frozen=True)
class EmbeddingDrift:
    """The embedding test and, per current sample it used, how "production-like" the
    classifier found it out of fold: the score that ranks images for labeling."""

    test: DriftTest
    current_rows: npt.NDArray[np.int64]
    """Row numbers (into ``current``) the scores belong to."""
    current_scores: Floats
    cut: float = math.inf
    """The score only one reference image in a hundred exceeds out of fold: an image above it
    looks unlike the training data, one below it may be a training-like image that shares the
    window with drifted ones."""


def embedding_test(
    reference: npt.ArrayLike,
    current: npt.ArrayLike,
    thresholds: DriftThresholds,
    *,
    seed: int = 0,
) -> EmbeddingDrift:
    """Domain classifier on embeddings (rows are samples): AUC and Mann-Whitney p-value."""
    # scikit-learn is only needed here; the import costs a second at start-up otherwise.
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]
    from sklearn.metrics import roc_auc_score  # type: ignore[import-untyped]
    from sklearn.model_selection import StratifiedKFold, cross_val_predict  # type: ignore[import-untyped]
    from sklearn.pipeline import make_pipeline  # type: ignore[import-untyped]
    from sklearn.preprocessing import StandardScaler  # type: ignore[import-untyped]

    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    # Rows of NaN are inferences logged without an embedding (the model's served config
    # lacked it for a while): left out, the others keep their row numbers.
    present = np.flatnonzero(~np.isnan(cur).any(axis=1)) if cur.ndim == 2 else np.zeros(0, int)
    if len(ref) < thresholds.min_reference_samples or len(present) < thresholds.min_samples:
        return EmbeddingDrift(
            _unjudged("embedding", "embedding", thresholds.min_auc, len(ref), len(present)),
            np.zeros(0, dtype=np.int64),
            np.zeros(0),
        )
    ref = _subsample(ref, thresholds.max_samples, seed)
    rows = _subsample(present, thresholds.max_samples, seed + 1)
    cur = cur[rows]
    features = np.vstack([ref, cur])
    target = np.concatenate([np.zeros(len(ref)), np.ones(len(cur))])
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=500))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    scores = cross_val_predict(model, features, target, cv=folds, method="predict_proba")[:, 1]
    auc = float(roc_auc_score(target, scores))
    # AUC = U / (n_ref * n_cur): the one-sided U test asks whether current scores rank higher.
    test = stats.mannwhitneyu(scores[target == 1], scores[target == 0], alternative="greater")
    p_value = float(test.pvalue)
    cut = float(np.quantile(scores[target == 0], LABEL_CUT_QUANTILE))
    result = DriftTest(
        kind="embedding",
        feature="embedding",
        judged=True,
        drifted=p_value < thresholds.p_value and auc >= thresholds.min_auc,
        statistic=float(test.statistic),
        p_value=p_value,
        effect=auc,
        threshold=thresholds.min_auc,
        reference_samples=len(ref),
        current_samples=len(cur),
        details={"dimensions": int(features.shape[1]), "folds": 5, "label_score_cut": cut},
    )
    return EmbeddingDrift(result, rows.astype(np.int64), scores[target == 1], cut)


def population_stability_index(reference: Floats, current: Floats, bins: int = 10) -> float:
    """PSI of ``current`` against ``reference`` over the reference's quantile bins."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)))
    if len(edges) < 2:  # a constant reference: one bin holding it, one for everything else
        edges = np.array([reference[0], reference[0] + 1e-12])
    inner = edges[1:-1]
    ref_share = np.bincount(np.searchsorted(inner, reference, side="right"), minlength=len(edges))
    cur_share = np.bincount(np.searchsorted(inner, current, side="right"), minlength=len(edges))
    expected = np.maximum(ref_share / len(reference), _PSI_EPSILON)
    actual = np.maximum(cur_share / len(current), _PSI_EPSILON)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def statistic_test(
    feature: str,
    reference: npt.ArrayLike,
    current: npt.ArrayLike,
    thresholds: DriftThresholds,
    *,
    seed: int = 0,
) -> DriftTest:
    """Kolmogorov-Smirnov p-value and PSI effect of one per-image statistic."""
    ref = np.asarray(reference, dtype=np.float64).ravel()
    cur = np.asarray(current, dtype=np.float64).ravel()
    if len(ref) < thresholds.min_reference_samples or len(cur) < thresholds.min_samples:
        return _unjudged("statistic", feature, thresholds.min_psi, len(ref), len(cur))
    ref = _subsample(ref, thresholds.max_samples, seed)
    cur = _subsample(cur, thresholds.max_samples, seed + 1)
    test = stats.ks_2samp(ref, cur)
    psi = population_stability_index(ref, cur)
    p_value = float(test.pvalue)
    return DriftTest(
        kind="statistic",
        feature=feature,
        judged=True,
        drifted=p_value < thresholds.p_value and psi >= thresholds.min_psi,
        statistic=float(test.statistic),
        p_value=p_value,
        effect=psi,
        threshold=thresholds.min_psi,
        reference_samples=len(ref),
        current_samples=len(cur),
        details={
            "reference_mean": float(ref.mean()),
            "current_mean": float(cur.mean()),
        },
    )


def classes_test(
    reference: Mapping[str, int], current: Mapping[str, int], thresholds: DriftThresholds
) -> DriftTest:
    """Chi-square test of predicted-class counts (classes seen on either side)."""
    classes = sorted(set(reference) | set(current))
    ref = np.array([reference.get(name, 0) for name in classes], dtype=np.float64)
    cur = np.array([current.get(name, 0) for name in classes], dtype=np.float64)
    n_ref, n_cur = int(ref.sum()), int(cur.sum())
    if n_ref < thresholds.min_reference_samples or n_cur < thresholds.min_samples:
        return _unjudged("classes", "predicted_class", thresholds.min_class_shift, n_ref, n_cur)
    table = _pooled_rare_classes(np.vstack([ref, cur]))
    if table.shape[1] < 2:  # one column left: nothing to compare
        chi2, p_value = 0.0, 1.0
    else:
        result = stats.chi2_contingency(table)
        chi2, p_value = float(result.statistic), float(result.pvalue)
    shift = float(0.5 * np.abs(ref / n_ref - cur / n_cur).sum())
    return DriftTest(
        kind="classes",
        feature="predicted_class",
        judged=True,
        drifted=p_value < thresholds.p_value and shift >= thresholds.min_class_shift,
        statistic=chi2,
        p_value=p_value,
        effect=shift,
        threshold=thresholds.min_class_shift,
        reference_samples=n_ref,
        current_samples=n_cur,
        details={
            "reference_shares": _shares(classes, ref),
            "current_shares": _shares(classes, cur),
        },
    )


def _pooled_rare_classes(table: Floats) -> Floats:
    """The 2 x K table with every class whose expected count is under 5 on either side pooled
    into one column (Cochran's rule: the chi-square approximation is not valid below it, and
    a small reference would call noise drift)."""
    table = table[:, table.sum(axis=0) > 0]
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / table.sum()
    rare = (expected < _MIN_EXPECTED).any(axis=0)
    if not rare.any():
        return table
    pooled = table[:, rare].sum(axis=1, keepdims=True)
    kept = table[:, ~rare]
    merged = np.hstack([kept, pooled])
    # The pooled column may itself be rare: then fold it into the smallest kept class.
    if (
        kept.shape[1]
        and (
            np.outer(merged.sum(axis=1), merged.sum(axis=0))[:, -1] / merged.sum() < _MIN_EXPECTED
        ).any()
    ):
        smallest = int(np.argmin(kept.sum(axis=0)))
        kept = kept.copy()
        kept[:, smallest] += pooled[:, 0]
        return kept
    return merged


def _shares(classes: Sequence[str], counts: Floats) -> dict[str, float]:
    total = counts.sum()
    return {
        name: round(float(count / total), 4) for name, count in zip(classes, counts, strict=True)
    }


# --- a window against its reference ---------------------------------------------------------


@dataclass(frozen=True)
class Features:
    """What drift compares, one row per image: from the training reference or the window.

    ``embeddings`` is None when the model declares no embedding output; a statistic missing
    from ``statistics`` is not compared. ``inputs`` (window only) identifies each row's image:
    its sha256 and, when the BFF stored it, its S3 key.
    """

    embeddings: Floats | None
    statistics: Mapping[str, Floats]
    predicted: Sequence[str]
    confidences: Sequence[float | None] = ()
    inputs: Sequence[tuple[str, str | None]] = ()

    def __len__(self) -> int:
        return len(self.predicted)


class DriftReport(BaseModel):
    """Every test of one window, and whether the window drifted."""

    model_config = ConfigDict(frozen=True)

    report_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    project_id: str
    model_line: str
    model_version: str
    window_start: datetime
    window_end: datetime
    samples: int
    reference_samples: int
    thresholds: DriftThresholds
    tests: list[DriftTest]

    @property
    def drifted(self) -> bool:
        return any(test.drifted for test in self.tests)

    def reasons(self) -> list[str]:
        """One line per drifted test, with its figures."""
        return [_reason(test) for test in self.tests if test.drifted]


def _reason(test: DriftTest) -> str:
    measure = {"embedding": "domain classifier AUC", "statistic": "PSI", "classes": "TVD"}
    return (
        f"{test.feature}: {measure[test.kind]} {test.effect:.2f} >= {test.threshold:.2f} "
        f"(p={test.p_value:.2g}, {test.current_samples} vs {test.reference_samples} samples)"
    )


@dataclass(frozen=True)
class LabelCandidate:
    """A recent image worth a label: drifted the most (score), with its pre-label."""

    input_sha256: str
    image_key: str
    score: float
    predicted_class: str | None
    confidence: float | None


@dataclass(frozen=True)
class Evaluation:
    """A report and the per-image scores behind its embedding test."""

    report: DriftReport
    scores: Mapping[int, float] = field(default_factory=dict)
    """Window row → drift score (embedding test), for the rows the test used."""
    cut: float = math.inf
    """Scores above it are unlike the training data (``EmbeddingDrift.cut``)."""


def evaluate(
    reference: Features,
    window: Features,
    thresholds: DriftThresholds,
    *,
    project_id: str,
    model_line: str,
    model_version: str,
    window_start: datetime,
    window_end: datetime,
) -> Evaluation:
    """Run every test that both sides have data for."""
    tests: list[DriftTest] = []
    scores: dict[int, float] = {}
    cut = math.inf
    if reference.embeddings is not None and window.embeddings is not None:
        embedding = embedding_test(reference.embeddings, window.embeddings, thresholds)
        tests.append(embedding.test)
        cut = embedding.cut
        scores = {
            int(row): float(score)
            for row, score in zip(embedding.current_rows, embedding.current_scores, strict=True)
        }
    for name in STATISTICS:
        if name in reference.statistics and name in window.statistics:
            tests.append(
                statistic_test(
                    name, reference.statistics[name], window.statistics[name], thresholds
                )
            )
    tests.append(classes_test(Counter(reference.predicted), Counter(window.predicted), thresholds))
    report = DriftReport(
        project_id=project_id,
        model_line=model_line,
        model_version=model_version,
        window_start=window_start,
        window_end=window_end,
        samples=len(window),
        reference_samples=len(reference),
        thresholds=thresholds,
        tests=tests,
    )
    return Evaluation(report=report, scores=scores, cut=cut)


def most_drifted(
    window: Features, scores: Mapping[int, float], limit: int, *, above: float = -math.inf
) -> list[LabelCandidate]:
    """At most ``limit`` stored images the domain classifier found least like the training
    data, scoring ``above`` the cut (``Evaluation.cut``: a window that is only partly drifted
    has fewer drifted images than the limit, and labels are asked for those alone), one per
    distinct image (the same image sent twice is one label)."""
    picked: list[LabelCandidate] = []
    seen: set[str] = set()
    for row, score in sorted(scores.items(), key=lambda item: (-item[1], item[0])):
        if len(picked) >= limit or score <= above:
            break
        sha256, key = window.inputs[row]
        if key is None or sha256 in seen:
            continue
        seen.add(sha256)
        confidence = window.confidences[row] if row < len(window.confidences) else None
        picked.append(LabelCandidate(sha256, key, score, window.predicted[row], confidence))
    return picked


def choose_action(
    *, fresh_labels: int, min_fresh_labels: int, candidates: int, request_pending: bool
) -> DriftAction:
    """What follows a drifted window.

    Retraining helps only with labels the champion has not been trained on (the drifted
    slice among them, with luck): with ``min_fresh_labels`` of them, retrain. Otherwise ask for
    labels on the drifted images, unless a request is still open (asking again would only
    reshuffle the labelers' queue) or no image of the window was stored: then only alert.
    """
    if fresh_labels >= min_fresh_labels:
        return DriftAction.RETRAIN
    if candidates > 0 and not request_pending:
        return DriftAction.LABELS_REQUESTED
    return DriftAction.ALERT
