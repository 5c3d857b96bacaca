"""Data-quality checks of one batch of labels: pure functions of its segment and a reference mix.

A batch failing any check is quarantined (never counted, never trained on). Checks:

* ``class_shift``: total variation distance between the batch's class mix and the reference
  mix, judged only for batches of at least ``min_batch_for_shift`` labels;
* ``duplicates``: share of the batch's labels that revise an existing label (``revision > 1``)
  or label an image already labeled earlier in the same batch;
* ``labeler_anomaly``: a labeler with at least ``labeler_min_labels`` labels in the batch who
  gave one class to more than ``labeler_max_class_share`` of them, while that class's share of
  the reference mix is below ``labeler_max_expected_share`` (one button pressed all day).

The reference mix is the class mix of the last retrain's snapshot, else the project's cumulative
counts, else the configured classes in equal shares; with none of them the mix-based checks are
skipped (recorded as not judged).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flywheel_contracts.datasets import ManifestEntry
from flywheel_contracts.events import QualityPolicy

ReferenceSource = Literal["trained_snapshot", "cumulative", "configured_classes", "none"]
CheckName = Literal["class_shift", "duplicates", "labeler_anomaly"]


class ReferenceMix(BaseModel):
    """Class counts a batch is compared with, and where they come from."""

    model_config = ConfigDict(frozen=True)

    source: ReferenceSource
    snapshot_id: str | None = None
    """The trained snapshot, when that is the source."""
    counts: dict[str, int] = Field(default_factory=dict)

    def shares(self) -> dict[str, float]:
        return shares(self.counts)


class Check(BaseModel):
    """One check's verdict with the figures it was based on."""

    model_config = ConfigDict(frozen=True)

    name: CheckName
    judged: bool
    """False when the batch or the reference was too small to judge; such a check passes."""
    passed: bool
    figures: dict[str, Any]
    reasons: list[str] = Field(default_factory=list)


class BatchQuality(BaseModel):
    """Every check of one batch."""

    model_config = ConfigDict(frozen=True)

    passed: bool
    label_count: int
    checks: list[Check]
    reasons: list[str]


def reference_mix(
    *,
    trained_snapshot_id: str | None,
    trained_counts: Mapping[str, int] | None,
    cumulative_counts: Mapping[str, int],
    class_names: Sequence[str],
) -> ReferenceMix:
    """The best reference available for a project (see the module docstring)."""
    if trained_snapshot_id is not None and trained_counts:
        return ReferenceMix(
            source="trained_snapshot", snapshot_id=trained_snapshot_id, counts=dict(trained_counts)
        )
    if any(cumulative_counts.values()):
        return ReferenceMix(source="cumulative", counts=dict(cumulative_counts))
    if class_names:
        return ReferenceMix(source="configured_classes", counts=dict.fromkeys(class_names, 1))
    return ReferenceMix(source="none")


def shares(counts: Mapping[str, int]) -> dict[str, float]:
    """Counts as shares of their total (empty when the total is 0)."""
    total = sum(counts.values())
    if total <= 0:
        return {}
    return {name: n / total for name, n in sorted(counts.items())}


def total_variation(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """Total variation distance of two distributions over class names: 0 same, 1 disjoint."""
    return 0.5 * sum(abs(p.get(c, 0.0) - q.get(c, 0.0)) for c in set(p) | set(q))


def class_shift(
    upserts: Sequence[ManifestEntry], reference: ReferenceMix, policy: QualityPolicy
) -> Check:
    """The batch's class mix against the reference mix."""
    batch = shares(Counter(e.class_name for e in upserts))
    figures: dict[str, Any] = {
        "batch_labels": len(upserts),
        "min_batch_for_shift": policy.min_batch_for_shift,
        "max_class_shift": policy.max_class_shift,
        "reference_source": reference.source,
        "reference_snapshot_id": reference.snapshot_id,
        "batch_mix": batch,
        "reference_mix": reference.shares(),
    }
    if len(upserts) < policy.min_batch_for_shift or not reference.shares():
        return Check(name="class_shift", judged=False, passed=True, figures=figures)
    distance = total_variation(batch, reference.shares())
    figures["total_variation"] = distance
    passed = distance <= policy.max_class_shift
    reasons = (
        []
        if passed
        else [
            f"class mix of {len(upserts)} labels is {distance:.2f} from the {reference.source} "
            f"mix (total variation; max {policy.max_class_shift:.2f})"
        ]
    )
    return Check(name="class_shift", judged=True, passed=passed, figures=figures, reasons=reasons)


def duplicates(upserts: Sequence[ManifestEntry], policy: QualityPolicy) -> Check:
    """Share of the batch that revises labels or repeats an image of the same batch."""
    seen: set[str] = set()
    revisions = repeats = duplicated = 0
    for entry in upserts:
        revision = entry.revision > 1
        repeat = entry.image_sha256 in seen
        revisions += revision
        repeats += repeat
        duplicated += revision or repeat
        seen.add(entry.image_sha256)
    rate = duplicated / len(upserts) if upserts else 0.0
    figures: dict[str, Any] = {
        "batch_labels": len(upserts),
        "revisions": revisions,
        "repeated_images": repeats,
        "duplicate_rate": rate,
        "max_duplicate_rate": policy.max_duplicate_rate,
    }
    passed = rate <= policy.max_duplicate_rate
    reasons = (
        []
        if passed
        else [
            f"{rate:.0%} of {len(upserts)} labels revise a label or repeat an image "
            f"(max {policy.max_duplicate_rate:.0%})"
        ]
    )
    return Check(
        name="duplicates", judged=bool(upserts), passed=passed, figures=figures, reasons=reasons
    )


def labeler_anomalies(
    upserts: Sequence[ManifestEntry], reference: ReferenceMix, policy: QualityPolicy
) -> Check:
    """Labelers who gave one class to nearly all their labels when the class is not that common."""
    by_labeler: dict[str, Counter[str]] = defaultdict(Counter)
    for entry in upserts:
        if entry.labeler is not None:
            by_labeler[entry.labeler][entry.class_name] += 1
    reference_shares = reference.shares()
    judged: list[dict[str, Any]] = []
    reasons: list[str] = []
    for labeler, classes in sorted(by_labeler.items()):
        labels = sum(classes.values())
        if labels < policy.labeler_min_labels or not reference_shares:
            continue
        top_class, top = min(classes.items(), key=lambda item: (-item[1], item[0]))
        top_share = top / labels
        expected = reference_shares.get(top_class, 0.0)
        anomalous = (
            top_share > policy.labeler_max_class_share
            and expected < policy.labeler_max_expected_share
        )
        judged.append(
            {
                "labeler": labeler,
                "labels": labels,
                "top_class": top_class,
                "top_share": top_share,
                "reference_share": expected,
                "anomalous": anomalous,
            }
        )
        if anomalous:
            reasons.append(
                f"labeler '{labeler}' gave class '{top_class}' to {top_share:.0%} of {labels} "
                f"labels (project share {expected:.0%})"
            )
    figures: dict[str, Any] = {
        "labeler_min_labels": policy.labeler_min_labels,
        "labeler_max_class_share": policy.labeler_max_class_share,
        "labeler_max_expected_share": policy.labeler_max_expected_share,
        "reference_source": reference.source,
        "labelers": judged,
    }
    return Check(
        name="labeler_anomaly",
        judged=bool(judged),
        passed=not reasons,
        figures=figures,
        reasons=reasons,
    )


def check_batch(
    upserts: Sequence[ManifestEntry], reference: ReferenceMix, policy: QualityPolicy
) -> BatchQuality:
    """Run every check on a batch's new and changed labels."""
    checks = [
        class_shift(upserts, reference, policy),
        duplicates(upserts, policy),
        labeler_anomalies(upserts, reference, policy),
    ]
    reasons = [reason for check in checks for reason in check.reasons]
    return BatchQuality(
        passed=all(c.passed for c in checks),
        label_count=len(upserts),
        checks=checks,
        reasons=reasons,
    )
