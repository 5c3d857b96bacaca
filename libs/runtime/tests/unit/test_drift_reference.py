import numpy as np
import pytest

from flywheel_runtime.drift_reference import (
    DriftReference,
    decode_reference,
    encode_reference,
    reference_key,
)


def test_a_reference_survives_the_round_trip() -> None:
    rng = np.random.default_rng(0)
    reference = DriftReference(
        predicted=["0", "7", "7"],
        embeddings=rng.normal(size=(3, 4)),
        statistics={"brightness": np.array([0.1, 0.2, 0.3]), "width": np.array([28.0] * 3)},
    )

    decoded = decode_reference(encode_reference(reference))

    assert list(decoded.predicted) == ["0", "7", "7"]
    assert decoded.embeddings is not None
    np.testing.assert_allclose(decoded.embeddings, reference.embeddings, rtol=1e-6)
    assert set(decoded.statistics) == {"brightness", "width"}
    np.testing.assert_array_equal(decoded.statistics["brightness"], [0.1, 0.2, 0.3])


def test_a_reference_without_embeddings_decodes_without_them() -> None:
    decoded = decode_reference(encode_reference(DriftReference(predicted=["1"])))

    assert decoded.embeddings is None
    assert decoded.statistics == {}


def test_an_unknown_statistic_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown statistic 'hue'"):
        encode_reference(DriftReference(predicted=["1"], statistics={"hue": np.zeros(1)}))


def test_references_are_keyed_by_line_and_version() -> None:
    assert reference_key("drift/reference/", "digits", "4") == "drift/reference/digits/4.npz"
