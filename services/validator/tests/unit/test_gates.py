import pytest

from flywheel_validator.gates import (
    Gates,
    ModelScore,
    ParityCheck,
    check_gates,
    gates_for,
    too_few_images,
)

GATES = Gates(
    accuracy_tolerance=0.005,
    macro_f1_tolerance=0.01,
    min_accuracy=0.9,
    min_macro_f1=0.85,
    min_class_recall=0.8,
    max_latency_p95_ms=20.0,
    parity_tolerance=1e-4,
    max_model_bytes=1_000_000,
    min_test_images=100,
)
PARITY = ParityCheck(max_abs_diff=2e-6, images=16)


def _score(
    accuracy: float = 0.95,
    macro_f1: float = 0.94,
    recall: dict[str, float] | None = None,
    p95: float = 5.0,
    size: int = 400_000,
) -> ModelScore:
    return ModelScore(
        test_images=150,
        accuracy=accuracy,
        macro_f1=macro_f1,
        per_class_recall=recall if recall is not None else {"0": 0.97, "1": 0.92},
        latency_p50_ms=p95 / 2,
        latency_p95_ms=p95,
        model_size_bytes=size,
    )


def _by_gate(results: list) -> dict[str, tuple[bool, str]]:
    return {r.gate: (r.passed, r.reason) for r in results}


def test_a_candidate_as_good_as_the_champion_passes_every_gate_with_its_numbers() -> None:
    results = check_gates(GATES, _score(accuracy=0.981), _score(accuracy=0.975), PARITY)

    gates = _by_gate(results)
    assert all(passed for passed, _ in gates.values())
    assert list(gates) == [
        "accuracy",
        "macro_f1",
        "class_recall",
        "latency",
        "parity",
        "model_size",
    ]
    assert gates["accuracy"][1] == "accuracy 0.981 >= champion 0.975 - 0.005: pass"
    assert gates["macro_f1"][1] == "macro-F1 0.940 >= champion 0.940 - 0.010: pass"
    assert gates["class_recall"][1] == "per-class recall min 0.920 (class '1') >= floor 0.800: pass"
    assert gates["latency"][1] == "latency p95 5.00 ms <= budget 20.00 ms: pass"
    assert gates["parity"][1] == "export parity max abs diff 2.00e-06 <= 1e-04 on 16 images: pass"
    assert gates["model_size"][1] == "model size 400000 bytes <= limit 1000000 bytes: pass"


@pytest.mark.parametrize(
    ("candidate", "passed"),
    [(0.970, True), (0.96999, False), (0.990, True)],
)
def test_accuracy_may_fall_at_most_the_tolerance_below_the_champion(
    candidate: float, passed: bool
) -> None:
    gates = _by_gate(check_gates(GATES, _score(accuracy=candidate), _score(accuracy=0.975), PARITY))

    assert gates["accuracy"][0] is passed
    assert gates["accuracy"][1].endswith("pass" if passed else "fail")


@pytest.mark.parametrize(("candidate", "passed"), [(0.93, True), (0.9299, False)])
def test_macro_f1_may_fall_at_most_its_tolerance_below_the_champion(
    candidate: float, passed: bool
) -> None:
    gates = _by_gate(check_gates(GATES, _score(macro_f1=candidate), _score(macro_f1=0.94), PARITY))

    assert gates["macro_f1"][0] is passed
    if not passed:
        assert gates["macro_f1"][1] == "macro-F1 0.930 < champion 0.940 - 0.010: fail"


def test_without_a_champion_the_absolute_floors_apply() -> None:
    on_floor = _by_gate(check_gates(GATES, _score(accuracy=0.9, macro_f1=0.85), None, PARITY))
    below = _by_gate(check_gates(GATES, _score(accuracy=0.899, macro_f1=0.849), None, PARITY))

    assert on_floor["accuracy"] == (True, "accuracy 0.900 >= floor 0.900 (no champion): pass")
    assert on_floor["macro_f1"] == (True, "macro-F1 0.850 >= floor 0.850 (no champion): pass")
    assert below["accuracy"] == (False, "accuracy 0.899 < floor 0.900 (no champion): fail")
    assert below["macro_f1"][0] is False


def test_a_champion_replaces_the_floors_even_when_it_is_below_them() -> None:
    gates = _by_gate(check_gates(GATES, _score(accuracy=0.6), _score(accuracy=0.6), PARITY))

    assert gates["accuracy"][0] is True


def test_every_class_below_the_recall_floor_is_named_worst_first() -> None:
    recall = {"0": 0.95, "3": 0.5, "8": 0.412, "9": 0.8}

    passed, reason = _by_gate(check_gates(GATES, _score(recall=recall), None, PARITY))[
        "class_recall"
    ]

    assert not passed
    assert reason == "per-class recall below floor 0.800: class '8' 0.412, class '3' 0.500: fail"


def test_no_recall_at_all_fails() -> None:
    passed, reason = _by_gate(check_gates(GATES, _score(recall={}), None, PARITY))["class_recall"]

    assert not passed
    assert "not measured" in reason


@pytest.mark.parametrize(("p95", "passed"), [(20.0, True), (20.01, False)])
def test_latency_p95_must_stay_within_the_budget(p95: float, passed: bool) -> None:
    gates = _by_gate(check_gates(GATES, _score(p95=p95), None, PARITY))

    assert gates["latency"][0] is passed


def test_parity_fails_above_the_tolerance_or_when_it_could_not_run() -> None:
    drifted = ParityCheck(max_abs_diff=0.31, images=16)
    broken = ParityCheck(error="the version has no state dict")

    over = _by_gate(check_gates(GATES, _score(), None, drifted))["parity"]
    missing = _by_gate(check_gates(GATES, _score(), None, broken))["parity"]

    assert over == (False, "export parity max abs diff 3.10e-01 > 1e-04 on 16 images: fail")
    assert missing == (False, "export parity not checked (the version has no state dict): fail")


def test_parity_passes_saying_why_when_it_does_not_apply() -> None:
    own = ParityCheck(not_applicable="TinyConvNet is not the reference DigitNet")

    gate = _by_gate(check_gates(GATES, _score(), None, own))["parity"]

    assert gate == (
        True,
        "export parity not applicable (TinyConvNet is not the reference DigitNet): pass",
    )


@pytest.mark.parametrize(("size", "passed"), [(1_000_000, True), (1_000_001, False)])
def test_model_size_is_limited(size: int, passed: bool) -> None:
    gates = _by_gate(check_gates(GATES, _score(size=size), None, PARITY))

    assert gates["model_size"][0] is passed


def test_a_test_split_below_the_minimum_fails_with_its_size() -> None:
    small = too_few_images(99, GATES)

    assert too_few_images(100, GATES) is None
    assert small is not None
    assert (small.gate, small.passed) == ("test_split", False)
    assert small.reason == "test split has 99 images < minimum 100: fail"


def test_a_project_override_replaces_only_the_fields_it_sets() -> None:
    overrides = {"strict": Gates(min_accuracy=0.99, max_latency_p95_ms=5.0)}

    strict = gates_for("strict", GATES, overrides)
    other = gates_for("other", GATES, overrides)

    assert (strict.min_accuracy, strict.max_latency_p95_ms) == (0.99, 5.0)
    assert strict.min_macro_f1 == GATES.min_macro_f1
    assert strict.max_model_bytes == GATES.max_model_bytes
    assert other == GATES
    assert not _by_gate(check_gates(strict, _score(accuracy=0.95), None, PARITY))["accuracy"][0]
    assert _by_gate(check_gates(other, _score(accuracy=0.95), None, PARITY))["accuracy"][0]


def test_metrics_flatten_per_class_recall() -> None:
    metrics = _score(recall={"0": 0.97, "1": 0.92}).metrics()

    assert metrics["recall.0"] == 0.97
    assert metrics["min_class_recall"] == 0.92
    assert metrics["model_size_bytes"] == 400_000.0
    assert "unknown_class_images" not in metrics
