"""The gates a candidate must pass, as pure functions of its measured numbers.

With a champion, the candidate may not fall more than a tolerance below it in accuracy and
macro-F1; without one (a model line's first version, or a champion that cannot be run), absolute
floors apply instead. Every candidate also meets a per-class recall floor, a CPU latency budget,
export parity between its PyTorch weights and its ONNX graph, and a size limit. Each gate
reports itself as one line with its numbers, ending in ``pass`` or ``fail``.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from flywheel_vision.export import PARITY_TOLERANCE

__all__ = [
    "GateResult",
    "Gates",
    "ModelScore",
    "ParityCheck",
    "check_gates",
    "gates_for",
    "too_few_images",
]

# Metrics are ratios of integers; a candidate exactly on a boundary must not fail by rounding.
_EPSILON = 1e-9


class Gates(BaseModel):
    """Thresholds of one project (the service's defaults, or a project's override)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    accuracy_tolerance: float = Field(default=0.005, ge=0, le=1)
    """How far the candidate's accuracy may fall below the champion's."""

    macro_f1_tolerance: float = Field(default=0.01, ge=0, le=1)
    """How far the candidate's macro-F1 may fall below the champion's."""

    min_accuracy: float = Field(default=0.9, ge=0, le=1)
    """Accuracy floor when there is no champion to compare with."""

    min_macro_f1: float = Field(default=0.9, ge=0, le=1)
    """Macro-F1 floor when there is no champion to compare with."""

    min_class_recall: float = Field(default=0.8, ge=0, le=1)
    """Recall every class of the test split must reach, champion or not."""

    max_latency_p95_ms: float = Field(default=50.0, gt=0)
    """Budget for the 95th percentile of single-image CPU latency on onnxruntime."""

    parity_tolerance: float = Field(default=PARITY_TOLERANCE, ge=0)
    """Largest absolute logit difference allowed between the state dict and the ONNX."""

    max_model_bytes: int = Field(default=50 * 1024 * 1024, ge=1)
    """Largest ONNX file that may ship."""

    min_test_images: int = Field(default=100, ge=1)
    """Fewer held-out images than this and no verdict but ``failed`` is trustworthy."""


def gates_for(project_id: str, default: Gates, overrides: Mapping[str, Gates]) -> Gates:
    """The gates of a project: the defaults, with the fields its override sets replaced."""
    override = overrides.get(project_id)
    if override is None:
        return default
    return default.model_copy(update=override.model_dump(include=override.model_fields_set))


class ModelScore(BaseModel):
    """How one model did on the test split, judged as deployed (ONNX on onnxruntime)."""

    model_config = ConfigDict(frozen=True)

    test_images: int
    accuracy: float
    macro_f1: float
    per_class_recall: dict[str, float]
    """By class name; every class of the test split has an entry."""
    latency_p50_ms: float
    latency_p95_ms: float
    model_size_bytes: int
    unknown_class_images: int = 0
    """Test images of classes the model does not know; scored as errors."""
    unknown_classes: list[str] = Field(default_factory=list)
    """Those classes, by name."""

    def metrics(self) -> dict[str, float]:
        """Flat numbers for events, tags and the API (per-class recall as ``recall.<class>``)."""
        numbers = {
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p95_ms": self.latency_p95_ms,
            "model_size_bytes": float(self.model_size_bytes),
            "test_images": float(self.test_images),
        }
        if self.per_class_recall:
            numbers["min_class_recall"] = min(self.per_class_recall.values())
        if self.unknown_class_images:
            numbers["unknown_class_images"] = float(self.unknown_class_images)
        return numbers | {f"recall.{name}": value for name, value in self.per_class_recall.items()}


class ParityCheck(BaseModel):
    """The candidate's state dict run in PyTorch against its ONNX on a few test images."""

    model_config = ConfigDict(frozen=True)

    max_abs_diff: float | None = None
    """Largest absolute logit difference; None when the check could not run."""
    images: int = 0
    error: str | None = None
    """Why the check could not run (no state dict, weights that do not fit the model …)."""
    not_applicable: str | None = None
    """Why parity does not apply: a model of its own architecture, whose training code the
    validator cannot rerun (its training checked its own export). The gate passes, saying so."""


class GateResult(BaseModel):
    """One gate's outcome and the line that explains it."""

    model_config = ConfigDict(frozen=True)

    gate: str
    passed: bool
    reason: str


def _outcome(passed: bool) -> str:
    return "pass" if passed else "fail"


def too_few_images(images: int, gates: Gates) -> GateResult | None:
    """The failed test-split gate when the split is too small to judge on; else None."""
    if images >= gates.min_test_images:
        return None
    return GateResult(
        gate="test_split",
        passed=False,
        reason=f"test split has {images} images < minimum {gates.min_test_images}: fail",
    )


def check_gates(
    gates: Gates, candidate: ModelScore, champion: ModelScore | None, parity: ParityCheck
) -> list[GateResult]:
    """Every gate, in a fixed order; the candidate passes when all of them pass."""
    return [
        _relative_or_floor(
            "accuracy",
            "accuracy",
            candidate.accuracy,
            None if champion is None else champion.accuracy,
            gates.accuracy_tolerance,
            gates.min_accuracy,
        ),
        _relative_or_floor(
            "macro_f1",
            "macro-F1",
            candidate.macro_f1,
            None if champion is None else champion.macro_f1,
            gates.macro_f1_tolerance,
            gates.min_macro_f1,
        ),
        _class_recall(candidate.per_class_recall, gates.min_class_recall),
        _latency(candidate.latency_p95_ms, gates.max_latency_p95_ms),
        _parity(parity, gates.parity_tolerance),
        _size(candidate.model_size_bytes, gates.max_model_bytes),
    ]


def _relative_or_floor(
    gate: str,
    label: str,
    value: float,
    champion: float | None,
    tolerance: float,
    floor: float,
) -> GateResult:
    if champion is None:
        passed = value >= floor - _EPSILON
        sign = ">=" if passed else "<"
        reason = f"{label} {value:.3f} {sign} floor {floor:.3f} (no champion): {_outcome(passed)}"
    else:
        passed = value >= champion - tolerance - _EPSILON
        sign = ">=" if passed else "<"
        reason = (
            f"{label} {value:.3f} {sign} champion {champion:.3f} - {tolerance:.3f}: "
            f"{_outcome(passed)}"
        )
    return GateResult(gate=gate, passed=passed, reason=reason)


def _class_recall(recall: Mapping[str, float], floor: float) -> GateResult:
    if not recall:
        return GateResult(
            gate="class_recall",
            passed=False,
            reason="per-class recall not measured (no labelled test images): fail",
        )
    below = sorted(
        ((name, value) for name, value in recall.items() if value < floor - _EPSILON),
        key=lambda item: (item[1], item[0]),
    )
    if below:
        listed = ", ".join(f"class {name!r} {value:.3f}" for name, value in below)
        return GateResult(
            gate="class_recall",
            passed=False,
            reason=f"per-class recall below floor {floor:.3f}: {listed}: fail",
        )
    name, value = min(recall.items(), key=lambda item: (item[1], item[0]))
    return GateResult(
        gate="class_recall",
        passed=True,
        reason=f"per-class recall min {value:.3f} (class {name!r}) >= floor {floor:.3f}: pass",
    )


def _latency(p95_ms: float, budget_ms: float) -> GateResult:
    passed = p95_ms <= budget_ms
    sign = "<=" if passed else ">"
    return GateResult(
        gate="latency",
        passed=passed,
        reason=f"latency p95 {p95_ms:.2f} ms {sign} budget {budget_ms:.2f} ms: {_outcome(passed)}",
    )


def _parity(parity: ParityCheck, tolerance: float) -> GateResult:
    if parity.not_applicable is not None:
        return GateResult(
            gate="parity",
            passed=True,
            reason=f"export parity not applicable ({parity.not_applicable}): pass",
        )
    if parity.max_abs_diff is None:
        cause = parity.error or "no images"
        return GateResult(
            gate="parity", passed=False, reason=f"export parity not checked ({cause}): fail"
        )
    passed = parity.max_abs_diff <= tolerance
    sign = "<=" if passed else ">"
    return GateResult(
        gate="parity",
        passed=passed,
        reason=(
            f"export parity max abs diff {parity.max_abs_diff:.2e} {sign} {tolerance:.0e} "
            f"on {parity.images} images: {_outcome(passed)}"
        ),
    )


def _size(size: int, limit: int) -> GateResult:
    passed = size <= limit
    sign = "<=" if passed else ">"
    return GateResult(
        gate="model_size",
        passed=passed,
        reason=f"model size {size} bytes {sign} limit {limit} bytes: {_outcome(passed)}",
    )
