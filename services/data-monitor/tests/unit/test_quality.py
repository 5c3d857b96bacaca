import hashlib
import uuid

import pytest

from flywheel_contracts.datasets import ManifestEntry, Split
from flywheel_contracts.events import QualityPolicy
from flywheel_data_monitor.quality import (
    ReferenceMix,
    check_batch,
    class_shift,
    duplicates,
    labeler_anomalies,
    reference_mix,
    total_variation,
)

POLICY = QualityPolicy(
    max_duplicate_rate=0.5,
    max_class_shift=0.5,
    min_batch_for_shift=10,
    labeler_min_labels=10,
    labeler_max_class_share=0.9,
    labeler_max_expected_share=0.5,
)
DIGITS = ReferenceMix(source="cumulative", counts={str(d): 10 for d in range(10)})


def _entry(
    class_name: str,
    *,
    image: str | None = None,
    labeler: str | None = "alice",
    revision: int = 1,
) -> ManifestEntry:
    sha = hashlib.sha256((image or uuid.uuid4().hex).encode()).hexdigest()
    return ManifestEntry(
        label_id=uuid.uuid4(),
        image_sha256=sha,
        image_key=f"images/{sha[:2]}/{sha}",
        class_name=class_name,
        split=Split.TRAIN,
        labeler=labeler,
        revision=revision,
    )


def _balanced(n: int, labeler: str | None = "alice") -> list[ManifestEntry]:
    return [_entry(str(i % 10), labeler=labeler) for i in range(n)]


# --- total variation and the reference ----------------------------------------------------------


def test_total_variation_of_equal_disjoint_and_partial_mixes() -> None:
    assert total_variation({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}) == 0
    assert total_variation({"a": 1.0}, {"b": 1.0}) == 1
    assert total_variation({"a": 0.7, "b": 0.3}, {"a": 0.4, "b": 0.4, "c": 0.2}) == pytest.approx(
        0.3
    )


def test_reference_prefers_trained_snapshot_then_cumulative_then_configured_classes() -> None:
    trained = reference_mix(
        trained_snapshot_id="snap-1",
        trained_counts={"a": 3},
        cumulative_counts={"b": 1},
        class_names=["a", "b"],
    )
    cumulative = reference_mix(
        trained_snapshot_id=None,
        trained_counts=None,
        cumulative_counts={"b": 1},
        class_names=["a", "b"],
    )
    configured = reference_mix(
        trained_snapshot_id=None, trained_counts=None, cumulative_counts={}, class_names=["a", "b"]
    )
    nothing = reference_mix(
        trained_snapshot_id=None, trained_counts=None, cumulative_counts={"a": 0}, class_names=[]
    )

    assert (trained.source, trained.snapshot_id, trained.counts) == (
        "trained_snapshot",
        "snap-1",
        {"a": 3},
    )
    assert (cumulative.source, cumulative.counts) == ("cumulative", {"b": 1})
    assert (configured.source, configured.shares()) == (
        "configured_classes",
        {"a": 0.5, "b": 0.5},
    )
    assert (nothing.source, nothing.shares()) == ("none", {})


# --- class shift --------------------------------------------------------------------------------


def test_class_shift_fails_a_batch_far_from_the_reference() -> None:
    batch = [_entry("1", labeler=None)] * 8 + [_entry("2", labeler=None)] * 2

    check = class_shift(batch, DIGITS, POLICY)

    assert check.judged
    assert not check.passed
    assert check.figures["total_variation"] == pytest.approx(0.8)
    assert check.figures["batch_mix"] == {"1": 0.8, "2": 0.2}
    assert check.reasons == [
        "class mix of 10 labels is 0.80 from the cumulative mix (total variation; max 0.50)"
    ]


def test_class_shift_passes_a_batch_like_the_reference() -> None:
    check = class_shift(_balanced(20), DIGITS, POLICY)

    assert check.judged
    assert check.passed
    assert check.figures["total_variation"] == pytest.approx(0)


def test_class_shift_exactly_at_the_maximum_passes() -> None:
    reference = ReferenceMix(source="cumulative", counts={"a": 1, "b": 1})
    batch = [_entry("a", labeler=None) for _ in range(10)]

    check = class_shift(batch, reference, POLICY)

    assert check.figures["total_variation"] == pytest.approx(0.5)
    assert check.passed


def test_class_shift_is_not_judged_on_a_small_batch() -> None:
    check = class_shift([_entry("1")] * 9, DIGITS, POLICY)

    assert not check.judged
    assert check.passed
    assert "total_variation" not in check.figures


def test_class_shift_is_not_judged_without_a_reference() -> None:
    check = class_shift([_entry("1")] * 50, ReferenceMix(source="none"), POLICY)

    assert not check.judged
    assert check.passed


# --- duplicates ---------------------------------------------------------------------------------


def test_duplicates_count_revisions_and_images_repeated_in_the_batch() -> None:
    batch = [
        _entry("1", image="a"),
        _entry("1", image="a"),  # repeat
        _entry("2", image="b", revision=2),  # revision
        _entry("3", image="b", revision=3),  # revision and repeat: counted once
        _entry("4", image="c"),
    ]

    check = duplicates(batch, POLICY)

    assert check.figures["revisions"] == 2
    assert check.figures["repeated_images"] == 2
    assert check.figures["duplicate_rate"] == pytest.approx(3 / 5)
    assert not check.passed
    assert check.reasons == ["60% of 5 labels revise a label or repeat an image (max 50%)"]


def test_duplicates_exactly_at_the_maximum_pass() -> None:
    batch = [_entry("1", image="a"), _entry("1", image="a"), _entry("1"), _entry("1", revision=2)]

    check = duplicates(batch, POLICY)

    assert check.figures["duplicate_rate"] == 0.5
    assert check.passed


def test_duplicates_of_an_empty_batch_pass_unjudged() -> None:
    check = duplicates([], POLICY)

    assert check.passed
    assert not check.judged
    assert check.figures["duplicate_rate"] == 0


# --- labeler anomalies --------------------------------------------------------------------------


def test_labeler_giving_one_rare_class_to_nearly_everything_is_anomalous() -> None:
    batch = [_entry("7", labeler="mallory") for _ in range(19)] + [_entry("1", labeler="mallory")]
    batch += _balanced(20, labeler="alice")

    check = labeler_anomalies(batch, DIGITS, POLICY)

    assert check.judged
    assert not check.passed
    assert check.reasons == [
        "labeler 'mallory' gave class '7' to 95% of 20 labels (project share 10%)"
    ]
    by_labeler = {row["labeler"]: row for row in check.figures["labelers"]}
    assert by_labeler["mallory"]["anomalous"]
    assert not by_labeler["alice"]["anomalous"]


def test_labeler_giving_a_common_class_is_not_anomalous() -> None:
    reference = ReferenceMix(source="cumulative", counts={"cat": 60, "dog": 40})
    batch = [_entry("cat", labeler="bob") for _ in range(20)]

    check = labeler_anomalies(batch, reference, POLICY)

    assert check.judged
    assert check.passed


def test_labeler_share_exactly_at_the_maximum_is_not_anomalous() -> None:
    batch = [_entry("7", labeler="carol") for _ in range(9)] + [_entry("1", labeler="carol")]

    check = labeler_anomalies(batch, DIGITS, POLICY)

    assert check.figures["labelers"][0]["top_share"] == 0.9
    assert check.passed


def test_labelers_below_min_labels_or_unknown_are_not_judged() -> None:
    batch = [_entry("7", labeler="dave") for _ in range(9)]
    batch += [_entry("7", labeler=None) for _ in range(30)]

    check = labeler_anomalies(batch, DIGITS, POLICY)

    assert not check.judged
    assert check.passed
    assert check.figures["labelers"] == []


def test_class_missing_from_the_reference_has_share_zero() -> None:
    batch = [_entry("cat", labeler="erin") for _ in range(10)]

    check = labeler_anomalies(batch, DIGITS, POLICY)

    assert not check.passed
    assert check.figures["labelers"][0]["reference_share"] == 0


def test_labelers_are_not_judged_without_a_reference() -> None:
    batch = [_entry("7", labeler="mallory") for _ in range(50)]

    check = labeler_anomalies(batch, ReferenceMix(source="none"), POLICY)

    assert not check.judged
    assert check.passed


# --- the whole batch ----------------------------------------------------------------------------


def test_a_clean_batch_passes_every_check() -> None:
    report = check_batch(_balanced(30), DIGITS, POLICY)

    assert report.passed
    assert report.label_count == 30
    assert [c.name for c in report.checks] == ["class_shift", "duplicates", "labeler_anomaly"]
    assert report.reasons == []


def test_a_batch_failing_several_checks_lists_every_reason() -> None:
    batch = [_entry("7", image="same", labeler="mallory") for _ in range(20)]

    report = check_batch(batch, DIGITS, POLICY)

    assert not report.passed
    assert {c.name for c in report.checks if not c.passed} == {
        "class_shift",
        "duplicates",
        "labeler_anomaly",
    }
    assert len(report.reasons) == 3
